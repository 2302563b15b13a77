"""A terminal chatbot about one video, answered by the LLaVA answerer alone (no other LLM).

    python -m agents.chatbot clip.mp4                                   # the paper's models (GPU)
    python -m agents.chatbot clip.mp4 --llm llava-hf/llava-onevision-qwen2-0.5b-ov-hf --device cpu
    python -m agents.chatbot clip.mp4 --tiny                            # offline wiring check

Multi-turn: each prompt carries a short transcript of the last turns, and every turn after the
first reuses the video's features (no decode, no vision encoder). ``/frames`` shows which
frames, times and regions the last answer used; ``/help`` lists the other commands. A thin
layer over :mod:`freevllm_tools.chat` (the same loop as ``freevllm chat``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from agents._common import add_model_options, check_video, load_pipeline
from freevllm_tools.chat import DEFAULT_HISTORY_TURNS, ChatSession, run_chat
from freevllm_tools.errors import FreeVideoError

__all__ = ["build_session", "main"]


def build_session(qa: Any, video: str, *, history_turns: int = DEFAULT_HISTORY_TURNS, max_new_tokens: int | None = None) -> ChatSession:
    """The chat session the bot runs: ``qa``'s answerer on ``video``."""
    return ChatSession(qa, video, history_turns=history_turns, max_new_tokens=max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agents.chatbot", description=__doc__.splitlines()[0])
    parser.add_argument("video")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--history-turns",
        type=int,
        default=DEFAULT_HISTORY_TURNS,
        help="earlier turns written into each prompt (default: %(default)s)",
    )
    add_model_options(parser)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    read: Callable[[str], str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Chat until /quit, end of input or Ctrl-C. ``read`` and ``out`` replace the terminal."""
    args = build_parser().parse_args(argv)
    try:
        check_video(args.video)
        qa = load_pipeline(args)
        session = build_session(qa, args.video, history_turns=args.history_turns, max_new_tokens=args.max_new_tokens)
        return run_chat(session, read=read, out=out)
    except FreeVideoError as error:
        print(f"chatbot: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
