"""What the agents share: the CLI's model flags plus ``--tiny``, loading the pipeline, a folder's library."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

# The CLI's own model flags and loader, so the agents take exactly what `freevllm ask` takes.
from freevllm_tools import cli
from freevllm_tools.cli import check_video
from freevllm_tools.errors import FreeVideoError

__all__ = [
    "add_model_options",
    "load_pipeline",
    "check_video",
    "open_folder_library",
    "folder_library_dir",
    "run_on_folder",
]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``freevllm ask``'s model flags, and ``--tiny``."""
    cli.add_model_options(parser)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="use tiny random models instead of --guide/--llm: offline and fast, answers are gibberish",
    )


def load_pipeline(args: argparse.Namespace) -> Any:
    """The :class:`~freevllm_tools.pipeline.FreeVideoLLM` the flags name (tiny with ``--tiny``)."""
    if not getattr(args, "tiny", False):
        return cli.load_pipeline(args)
    from freevllm_tools.cache import FeatureCache
    from freevllm_tools.testing import tiny_free_video_llm

    qa = tiny_free_video_llm(config=args.preset)
    if not args.no_cache:
        qa.cache = FeatureCache(args.cache_dir)
    return qa


def folder_library_dir(folder: str | os.PathLike[str]) -> Path:
    """Where a folder's own library lives unless told otherwise: the user cache, one per folder."""
    import platformdirs

    digest = hashlib.sha256(os.path.realpath(folder).encode()).hexdigest()[:16]
    return Path(platformdirs.user_cache_dir("freevllm")) / "folder-libraries" / digest


def open_folder_library(
    folder: str | os.PathLike[str], qa: Any, library_dir: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> Any:
    """A :class:`~freevllm_tools.library.VideoLibrary` holding the folder's videos (indexed now;
    unchanged files are skipped), on the pipeline's guide and feature cache."""
    from freevllm_tools.errors import InputError
    from freevllm_tools.library import VideoLibrary

    if not os.path.isdir(folder):
        raise InputError(f"{folder!r} is not a folder; pass the folder that holds the videos")
    library = VideoLibrary(library_dir or folder_library_dir(folder), qa.guide, cache=qa.cache if qa.cache is not None else False)
    report = library.add(os.fspath(folder), progress=progress)
    if report.failed or report.warnings:
        print(report, file=sys.stderr)
    return library


def run_on_folder(
    prog: str,
    args: argparse.Namespace,
    build_agent: Callable[[Any, Any], Any],
    converse: Callable[[Any, Iterable[str]], None],
    out: TextIO,
) -> int:
    """An agent's ``main``: load the pipeline, index ``args.folder``, build the agent from
    ``(qa, library)``, and ``converse`` over ``args.question`` or stdin's non-empty lines.

    Returns the exit status: 0, 2 after an error of the project's own type (printed as one
    line), 130 when interrupted. The library is closed whatever happens.
    """
    library = None
    try:
        qa = load_pipeline(args)
        library = open_folder_library(args.folder, qa, args.library, progress=False)
        agent = build_agent(qa, library)
        print(f"{len(library)} video(s) in {args.folder}", file=out)
        questions = [args.question] if args.question else (line.strip() for line in sys.stdin)
        converse(agent, (q for q in questions if q))
    except FreeVideoError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if library is not None:
            library.close()
    return 0
