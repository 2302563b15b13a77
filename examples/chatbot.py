"""A chatbot about one video, in a few lines: multi-turn, LLaVA alone answers, grounded turns.

    python examples/chatbot.py clip.mp4                   # a short scripted chat, then your turn
    python examples/chatbot.py --tiny --no-interactive    # offline: tiny random models, a generated video

Every turn after the first reuses the video's features (a cache hit: no decode, no vision
encoder); each prompt carries a short transcript of the last turns (see freevllm_tools.chat).
For the full terminal app: ``python -m agents.chatbot VIDEO`` or ``freevllm chat VIDEO``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from freevllm_tools import FreeVideoLLM
from freevllm_tools.chat import ChatSession, run_chat
from freevllm_tools.testing import tiny_free_video_llm, write_video


def load(args: argparse.Namespace, workdir: Path) -> FreeVideoLLM:
    if args.tiny:  # random weights: the wiring runs, the answers are gibberish
        return tiny_free_video_llm(cache_dir=workdir / "cache")
    return FreeVideoLLM.from_pretrained(llm=args.llm, device=args.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", help="a video file (default: a generated clip)")
    parser.add_argument("--ask", action="append", help="a question (repeat; default: two questions)")
    parser.add_argument("--no-interactive", action="store_true", help="stop after the scripted questions")
    parser.add_argument("--llm", default="llava-hf/llava-v1.6-vicuna-7b-hf")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny random models, offline")
    args = parser.parse_args(argv)
    questions = args.ask or ["What moves across the picture?", "Where does it end up?"]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        video = args.video or write_video(workdir / "clip.mp4", num_frames=60)
        chat = ChatSession(load(args, workdir), video, history_turns=2)

        for question in questions:
            turn = chat.ask(question)
            print(f"you> {question}")
            print(f"llava> {turn.answer}")
            hit = "cache hit" if turn.result.cache_hit else "features computed"
            print(f"  [{hit}; the prompt carried {turn.history_used} earlier turn(s)]")
        print(chat.frames_text())  # what /frames shows: frames, times and regions of the last answer

        if not args.no_interactive and sys.stdin.isatty():
            run_chat(chat)  # your turn: /frames, /history, /help, /quit
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
