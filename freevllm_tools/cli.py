"""``freevllm``: ask, index, search, chat, inspect and demo from a terminal.

Errors of the project's own family print as one line (what, why, the fix) and exit with
status 2; nothing here prints a traceback for a bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import list_presets
from .errors import FreeVideoError

__all__ = ["main", "build_parser", "add_model_options", "load_pipeline", "check_video", "print_provenance"]

DEFAULT_GUIDE = "ViT-L-14-336"
DEFAULT_GUIDE_PRETRAINED = "openai"
DEFAULT_LLM = "llava-hf/llava-v1.6-vicuna-7b-hf"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model flags of ``ask``, ``inspect`` and ``chat`` (the agents in ``agents/`` take them too)."""
    group = parser.add_argument_group("models")
    group.add_argument("--guide", default=DEFAULT_GUIDE, help="open_clip model name or config JSON (default: %(default)s)")
    group.add_argument(
        "--guide-pretrained",
        default=DEFAULT_GUIDE_PRETRAINED,
        help="open_clip weights tag or a local checkpoint file (default: %(default)s)",
    )
    group.add_argument(
        "--llm",
        default=DEFAULT_LLM,
        help="LLaVA-family model: hub name or local directory (default: %(default)s; "
        "on a CPU try llava-hf/llava-onevision-qwen2-0.5b-ov-hf)",
    )
    group.add_argument(
        "--preset",
        default="paper",
        help=f"perception preset ({', '.join(list_presets())}) or a reference string (default: %(default)s)",
    )
    group.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda when present)")
    group.add_argument("--cache-dir", default=None, help="feature cache folder (default: FREEVLLM_CACHE or the user cache)")
    group.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")


def load_pipeline(args: argparse.Namespace) -> Any:
    """The :class:`~freevllm_tools.pipeline.FreeVideoLLM` that :func:`add_model_options`' flags name."""
    from .pipeline import FreeVideoLLM

    return FreeVideoLLM.from_pretrained(
        guide=args.guide,
        llm=args.llm,
        preset=args.preset,
        guide_pretrained=args.guide_pretrained,
        device=args.device,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
    )


def print_provenance(result: Any, out: Any = None) -> None:
    """Per pathway: tokens, kept frames with their times and RoI boxes; then the total."""
    print(result.provenance_text(), file=out or sys.stdout)


def check_video(path: str) -> None:
    """Fail on a bad video before spending time on loading models."""
    from .video import probe

    probe(path)


def cmd_ask(args: argparse.Namespace) -> int:
    check_video(args.video)
    qa = load_pipeline(args)
    if args.json:
        result = qa.ask(args.video, args.question, max_new_tokens=args.max_new_tokens, progress=True)
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    result = qa.ask(
        args.video,
        args.question,
        max_new_tokens=args.max_new_tokens,
        progress=True,
        on_text=lambda piece: print(piece, end="", flush=True),
    )
    print()
    print_provenance(result)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    check_video(args.video)
    qa = load_pipeline(args)
    result = qa.ask(args.video, args.question, max_new_tokens=args.max_new_tokens, progress=True)
    path = qa.contact_sheet(result, args.out)
    print(f"Answer: {result.answer}")
    print_provenance(result)
    print(f"contact sheet: {path}")
    return 0


def _add_library_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("library")
    group.add_argument("--library", default=None, help="library folder (default: FREEVLLM_LIBRARY or the user data dir)")
    group.add_argument("--guide", default=DEFAULT_GUIDE, help="open_clip model name or saved directory (default: %(default)s)")
    group.add_argument("--guide-pretrained", default=DEFAULT_GUIDE_PRETRAINED, help="weights tag or local checkpoint")
    group.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    group.add_argument("--cache-dir", default=None, help="feature cache folder shared with `ask`")


def _open_library(args: argparse.Namespace) -> Any:
    from .cache import FeatureCache
    from .guide import ClipGuide
    from .library import VideoLibrary, default_library_dir

    guide = ClipGuide.from_pretrained(args.guide, args.guide_pretrained, device=args.device)
    return VideoLibrary(args.library or default_library_dir(), guide, cache=FeatureCache(args.cache_dir))


def cmd_index(args: argparse.Namespace) -> int:
    library = _open_library(args)
    report = library.add(args.paths, recursive=not args.no_recursive, progress=True)
    print(report)
    return 0 if report.ok else 1


def cmd_search(args: argparse.Namespace) -> int:
    from .library import format_moments

    library = _open_library(args)
    print(format_moments(library.search(args.query, k=args.k), as_json=args.json))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession, run_chat

    check_video(args.video)
    qa = load_pipeline(args)
    session = ChatSession(
        qa, args.video, history_turns=args.history_turns, max_new_tokens=args.max_new_tokens
    )
    return run_chat(session)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freevllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about a video")
    ask.add_argument("video")
    ask.add_argument("question")
    ask.add_argument("--json", action="store_true", help="print the full result as JSON")
    ask.add_argument("--max-new-tokens", type=int, default=128)
    add_model_options(ask)
    ask.set_defaults(func=cmd_ask)

    inspect = sub.add_parser("inspect", help="answer and draw a contact sheet of the frames and regions used")
    inspect.add_argument("video")
    inspect.add_argument("question")
    inspect.add_argument("--out", default="contact_sheet.png")
    inspect.add_argument("--max-new-tokens", type=int, default=128)
    add_model_options(inspect)
    inspect.set_defaults(func=cmd_inspect)

    index = sub.add_parser("index", help="index videos (files or folders) into a library for search")
    index.add_argument("paths", nargs="+")
    index.add_argument("--no-recursive", action="store_true", help="do not descend into sub-folders")
    _add_library_options(index)
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="find the moments in a library that match a description")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=5, help="moments to return (default: %(default)s)")
    search.add_argument("--json", action="store_true", help="print the moments as JSON")
    _add_library_options(search)
    search.set_defaults(func=cmd_search)

    chat = sub.add_parser("chat", help="chat about one video in the terminal (LLaVA alone answers)")
    chat.add_argument("video")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument(
        "--history-turns", type=int, default=2, help="earlier turns written into each prompt (default: %(default)s)"
    )
    add_model_options(chat)
    chat.set_defaults(func=cmd_chat)

    demo = sub.add_parser("demo", help="run the whole method offline on a synthetic video")
    demo.add_argument("--out", default="demo_out")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``freevllm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FreeVideoError as error:
        print(f"freevllm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("freevllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
