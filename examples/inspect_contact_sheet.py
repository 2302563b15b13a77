"""Inspect an answer: draw the frames each pathway kept, with RoI boxes and times, into a PNG.

    python examples/inspect_contact_sheet.py clip.mp4 "Where is the dog?" --out sheet.png
    python examples/inspect_contact_sheet.py --tiny --out sheet.png      # offline, generated video
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
    parser.add_argument("question", nargs="?", default="Where is the yellow square?")
    parser.add_argument("--out", default="contact_sheet.png", help="the PNG to write")
    parser.add_argument("--llm", default="llava-hf/llava-v1.6-vicuna-7b-hf")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny random models, offline")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        video = args.video or write_video(workdir / "clip.mp4", num_frames=60, size=(160, 120))
        qa = load(args, workdir)
        result = qa.ask(video, args.question)
        print(f"Answer: {result.answer}")
        for name, pathway in result.pathways.items():
            if name == "fast":
                print(f"  fast: {len(pathway.frame_indices)} whole frames, {pathway.num_tokens} tokens")
                continue
            for index, time, box in zip(pathway.frame_indices, pathway.timestamps, pathway.boxes_px):
                print(f"  {name}: frame {index} at {time:.2f}s, region (x0, y0, x1, y1) = {box}")

        # The sheet needs the frames themselves: the pipeline decodes the ones it sampled.
        sheet = qa.contact_sheet(result, args.out)
        print(f"Contact sheet: {sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
