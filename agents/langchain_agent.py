"""A LangChain agent that answers questions about a folder of videos.

    python -m agents.langchain_agent videos/ "Which clip shows a dog?" --model openai:gpt-4o-mini
    python -m agents.langchain_agent videos/ --model ollama:llama3.1      # questions from stdin

The chat model is any ``provider:model`` that ``langchain.chat_models.init_chat_model`` knows
(install its package, e.g. ``langchain-openai``, and set its key). It plans and talks; the
video tools do the looking: ``video_search`` finds moments across the folder's library (indexed
on start; unchanged files are skipped) and ``video_qa`` answers a question about one video with
Free Video-LLM, returning the answer with the times and regions it rests on. The ``freevllm``
model flags pick the video models (``--llm``, ``--guide``, ``--device``, or ``--tiny``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from langchain.chat_models import init_chat_model
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from agents._common import add_model_options, run_on_folder
from freevllm_tools.integrations.langchain import FreeVideoToolkit

__all__ = ["build_agent", "ask", "main", "SYSTEM_PROMPT"]

SYSTEM_PROMPT = (
    "You answer questions about the videos in one folder. You cannot see the videos yourself: "
    "use video_search to find which video and moment shows something, and video_qa to ask about "
    "one video (by the video id video_search gives, or by its file name). Say which video and "
    "which times (in seconds) your answer rests on. If a tool returns an error, say what went wrong."
)


def build_agent(
    model: Any,
    qa: Any,
    library: Any,
    *,
    allowed_roots: Sequence[str] | None = None,
    system_prompt: str = SYSTEM_PROMPT,
) -> Any:
    """A ``create_agent`` graph with ``video_qa`` and ``video_search`` over ``library``.

    ``model`` is a LangChain chat model, or a ``"provider:model"`` name for ``init_chat_model``.
    ``allowed_roots`` are the folders ``video_qa`` may read paths from (default: the library's).
    """
    from langchain.agents import create_agent

    if isinstance(model, str):
        model = init_chat_model(model)
    roots = list(allowed_roots) if allowed_roots is not None else None
    tools = FreeVideoToolkit(qa=qa, library=library, allowed_roots=roots).get_tools()
    return create_agent(model, tools, system_prompt=system_prompt)


def ask(agent: Any, question: str, history: list[BaseMessage] | None = None) -> list[BaseMessage]:
    """Run the agent on ``question`` after ``history``; the whole conversation comes back."""
    state = agent.invoke({"messages": [*(history or []), HumanMessage(question)]})
    return list(state["messages"])


def print_turn(messages: Sequence[BaseMessage], start: int, out: TextIO) -> None:
    """The tool calls and results since ``start``, then the agent's answer."""
    for message in messages[start:]:
        if isinstance(message, AIMessage):
            for call in message.tool_calls:
                args = ", ".join(f"{k}={v!r}" for k, v in call["args"].items())
                print(f"  -> {call['name']}({args})", file=out)
        elif isinstance(message, ToolMessage):
            first, *rest = str(message.content).splitlines() or [""]
            status = "" if message.status == "success" else f" [{message.status}]"
            print(f"  <- {message.name}{status}: {first}", file=out)
            for line in rest:
                print(f"     {line}", file=out)
    final = messages[-1]
    print(f"agent> {final.content if isinstance(final, AIMessage) else ''}", file=out, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agents.langchain_agent", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the folder of videos")
    parser.add_argument("question", nargs="?", help="one question; without it, questions are read from stdin")
    parser.add_argument(
        "--model", default=None, help="chat model as provider:model, e.g. openai:gpt-4o-mini or ollama:llama3.1"
    )
    parser.add_argument("--library", default=None, help="library folder (default: one per video folder, in the user cache)")
    add_model_options(parser)
    return parser


def main(argv: Sequence[str] | None = None, *, model: Any = None, out: TextIO | None = None) -> int:
    """Answer the question (or each line of stdin) and print the tool calls and the answer.

    ``model`` replaces ``--model`` with a chat model object (tests pass a scripted one).
    """
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    if model is None and args.model is None:
        parser.error("pass --model provider:model, e.g. --model openai:gpt-4o-mini (pip install langchain-openai)")
    chat_model = model if model is not None else args.model

    def converse(agent: Any, questions: Any) -> None:
        history: list[BaseMessage] = []
        for question in questions:
            print(f"you> {question}", file=out)
            messages = ask(agent, question, history)
            print_turn(messages, len(history) + 1, out)
            history = messages

    return run_on_folder(
        "langchain_agent",
        args,
        lambda qa, library: build_agent(chat_model, qa, library, allowed_roots=[args.folder]),
        converse,
        out,
    )


if __name__ == "__main__":
    raise SystemExit(main())
