"""A LlamaIndex ``FunctionAgent`` that answers questions about a folder of videos.

    python -m agents.llama_index_agent videos/ "What happens in the kitchen clip?" --model openai:gpt-4o-mini
    python -m agents.llama_index_agent videos/ --model ollama:llama3.1       # questions from stdin

The agent's LLM is named ``provider:model`` (``openai``, ``anthropic`` or ``ollama``; install
``llama-index-llms-<provider>``). Its tools come from
:class:`~freevllm_tools.integrations.llama_index.FreeVideoToolSpec`: ``search_video_library``
over the folder's library (indexed on start) and ``answer_video_question`` about one video,
answered by Free Video-LLM with the times and regions it rests on. The ``freevllm`` model flags
pick the video models (``--llm``, ``--guide``, ``--device``, or ``--tiny``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from llama_index.core.agent.workflow import FunctionAgent, ToolCall, ToolCallResult
from llama_index.core.workflow import Context

from agents._common import add_model_options, run_on_folder
from freevllm_tools.errors import InputError
from freevllm_tools.integrations.llama_index import FreeVideoToolSpec

__all__ = ["build_agent", "ask", "load_llm", "main", "SYSTEM_PROMPT", "PROVIDERS"]

SYSTEM_PROMPT = (
    "You answer questions about the videos in one folder. You cannot see the videos yourself: "
    "use search_video_library to find which video and moment shows something, and "
    "answer_video_question to ask about one video (by the video id the search gives, or by its "
    "file name). Say which video and which times (in seconds) your answer rests on. If a tool "
    "returns an error, say what went wrong."
)

#: provider -> (module, class, keyword for the model name, pip package)
PROVIDERS = {
    "openai": ("llama_index.llms.openai", "OpenAI", "model", "llama-index-llms-openai"),
    "anthropic": ("llama_index.llms.anthropic", "Anthropic", "model", "llama-index-llms-anthropic"),
    "ollama": ("llama_index.llms.ollama", "Ollama", "model", "llama-index-llms-ollama"),
}


def load_llm(name: str) -> Any:
    """The LlamaIndex LLM named ``provider:model``, e.g. ``openai:gpt-4o-mini``."""
    provider, _, model = name.partition(":")
    if provider not in PROVIDERS or not model:
        msg = f"--model must be provider:model with a provider in {sorted(PROVIDERS)}, got {name!r}"
        raise InputError(msg)
    module_name, class_name, keyword, package = PROVIDERS[provider]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        msg = f"the {provider} LLM needs the {package} package ({error}); pip install {package}"
        raise InputError(msg) from error
    return getattr(module, class_name)(**{keyword: model})


def build_agent(
    llm: Any,
    qa: Any,
    library: Any,
    *,
    allowed_roots: Sequence[str] | None = None,
    system_prompt: str = SYSTEM_PROMPT,
) -> FunctionAgent:
    """A ``FunctionAgent`` with ``answer_video_question`` and ``search_video_library``.

    ``llm`` is a function-calling LlamaIndex LLM, or a ``"provider:model"`` name for :func:`load_llm`.
    """
    if isinstance(llm, str):
        llm = load_llm(llm)
    tools = FreeVideoToolSpec(qa=qa, library=library, allowed_roots=allowed_roots).to_tool_list()
    return FunctionAgent(tools=tools, llm=llm, system_prompt=system_prompt)


async def ask(agent: FunctionAgent, question: str, ctx: Context | None = None, out: TextIO | None = None) -> str:
    """Run the agent on ``question`` (in ``ctx``, which keeps the conversation); print the tool
    calls and results to ``out`` as they happen; return the agent's answer."""
    handler = agent.run(user_msg=question, ctx=ctx)
    async for event in handler.stream_events():
        if out is None:
            continue
        if isinstance(event, ToolCallResult):
            text = str(event.tool_output.content)
            first, *rest = text.splitlines() or [""]
            status = " [error]" if event.tool_output.is_error else ""
            print(f"  <- {event.tool_name}{status}: {first}", file=out)
            for line in rest:
                print(f"     {line}", file=out)
        elif isinstance(event, ToolCall):
            args = ", ".join(f"{k}={v!r}" for k, v in event.tool_kwargs.items())
            print(f"  -> {event.tool_name}({args})", file=out)
    output = await handler
    return str(output.response.content or "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agents.llama_index_agent", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the folder of videos")
    parser.add_argument("question", nargs="?", help="one question; without it, questions are read from stdin")
    parser.add_argument("--model", default=None, help=f"agent LLM as provider:model, provider one of {sorted(PROVIDERS)}")
    parser.add_argument("--library", default=None, help="library folder (default: one per video folder, in the user cache)")
    add_model_options(parser)
    return parser


async def _chat(agent: FunctionAgent, questions: Any, out: TextIO) -> None:
    ctx = Context(agent)
    for question in questions:
        print(f"you> {question}", file=out)
        answer = await ask(agent, question, ctx, out)
        print(f"agent> {answer}", file=out, flush=True)


def main(argv: Sequence[str] | None = None, *, llm: Any = None, out: TextIO | None = None) -> int:
    """Answer the question (or each line of stdin) and print the tool calls and the answer.

    ``llm`` replaces ``--model`` with an LLM object (tests pass a scripted one).
    """
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    if llm is None and args.model is None:
        parser.error("pass --model provider:model, e.g. --model openai:gpt-4o-mini (pip install llama-index-llms-openai)")
    chat_llm = llm if llm is not None else args.model
    return run_on_folder(
        "llama_index_agent",
        args,
        lambda qa, library: build_agent(chat_llm, qa, library, allowed_roots=[args.folder]),
        lambda agent, questions: asyncio.run(_chat(agent, questions, out)),
        out,
    )


if __name__ == "__main__":
    raise SystemExit(main())
