"""Quick start: ask a question about a video; get the answer and the frames, times and regions it used.

    python examples/quickstart.py clip.mp4 "What happens at the end?"            # the paper's models (GPU)
    python examples/quickstart.py clip.mp4 "..." --llm llava-hf/llava-onevision-qwen2-0.5b-ov-hf --device cpu
    python examples/quickstart.py --tiny       # offline: tiny random models, a generated video
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from freevllm_tools import FreeVideoLLM
from freevllm_tools.testing import tiny_free_video_llm, write_video


def load(args: argparse.Namespace, workdir: Path) -> FreeVideoLLM:
    if args.tiny:  # random weights: the wiring runs, the answers are gibberish
        return tiny_free_video_llm(cache_dir=workdir / "cache")
    return FreeVideoLLM.from_pretrained(llm=args.llm, device=args.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", help="a video file (default: a generated clip)")
    parser.add_argument("question", nargs="?", default="What moves across the picture?")
    parser.add_argument("--llm", default="llava-hf/llava-v1.6-vicuna-7b-hf")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny random models, offline")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        video = args.video or write_video(workdir / "clip.mp4", num_frames=60)
        qa = load(args, workdir)

        result = qa.ask(video, args.question)
        print(f"Q: {args.question}")
        print(f"Answer: {result.answer}")
        print(f"Based on: {result.grounding()}")
        print(f"Visual tokens: {result.num_visual_tokens}, seconds: {result.timings['total']:.2f}")

        # A second question about the same video reuses the cached features: no decode, no vision encoder.
        again = qa.ask(video, "What colour is the background?")
        print(f"Second answer: {again.answer}")
        print(f"Second question from the cache: {again.cache_hit}, seconds: {again.timings['total']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
