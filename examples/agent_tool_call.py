"""An agent's tool call: a LangChain agent calls ``video_qa`` and reads the grounded answer.

    python examples/agent_tool_call.py clip.mp4 --model openai:gpt-4o-mini    # pip install langchain-openai
    python examples/agent_tool_call.py --tiny     # offline: tiny video models, a scripted chat model

The tool's content (what the chat model reads) carries the answer *and* the times and regions it
rests on; its artifact (for your code, never sent to the model) is the full ``AskResult``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain.chat_models import init_chat_model
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from freevllm_tools import FreeVideoLLM
from freevllm_tools.integrations.langchain import FreeVideoQATool
from freevllm_tools.testing import tiny_free_video_llm, write_video


class OfflineToolCaller(BaseChatModel):
    """Stands in for a real chat model offline: calls video_qa once, then reports what it returned."""

    video: str
    question: str

    @property
    def _llm_type(self) -> str:
        return "offline-tool-caller"

    def bind_tools(self, tools: Any, **kwargs: Any) -> OfflineToolCaller:
        return self

    def _generate(self, messages: list, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        if isinstance(messages[-1], ToolMessage):
            reply = AIMessage(content=f"The video tool says:\n{messages[-1].content}")
        else:
            call = {"name": "video_qa", "args": {"video": self.video, "question": self.question}, "id": "call-1"}
            reply = AIMessage(content="", tool_calls=[call])
        return ChatResult(generations=[ChatGeneration(message=reply)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", help="a video file (default: a generated clip)")
    parser.add_argument("--question", default="What moves across the picture, and when?")
    parser.add_argument("--model", default=None, help="chat model as provider:model, e.g. openai:gpt-4o-mini")
    parser.add_argument("--llm", default="llava-hf/llava-v1.6-vicuna-7b-hf")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny video models and a scripted chat model, offline")
    args = parser.parse_args(argv)
    if not args.tiny and not args.model:
        parser.error("pass --model provider:model (or --tiny to run offline)")

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(args.video or write_video(Path(tmp) / "clip.mp4", num_frames=60)).resolve()
        if args.tiny:
            qa = tiny_free_video_llm(cache_dir=Path(tmp) / "cache")
            model = OfflineToolCaller(video=video.name, question=args.question)
        else:
            qa = FreeVideoLLM.from_pretrained(llm=args.llm, device=args.device)
            model = init_chat_model(args.model)

        # The tool reads only inside the video's folder; paths an LLM writes are checked against it.
        tool = FreeVideoQATool(qa=qa, allowed_roots=[str(video.parent)])
        agent = create_agent(model, [tool], system_prompt="Use video_qa to look at the video; quote the times.")
        request = f"In {video.name}: {args.question}"
        state = agent.invoke({"messages": [HumanMessage(request)]})

        for message in state["messages"]:
            if isinstance(message, AIMessage) and message.tool_calls:
                for call in message.tool_calls:
                    print(f"Tool call: {call['name']}({call['args']})")
            elif isinstance(message, ToolMessage):
                print(f"Tool result ({message.status}):\n{message.content}")
                if message.artifact:  # structured, for your code: frames, times, boxes
                    slow = message.artifact["pathways"]["slow"]
                    print(f"Artifact: slow frames {slow['frame_indices']} at {slow['timestamps']} s")
        print(f"Agent: {state['messages'][-1].content}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
