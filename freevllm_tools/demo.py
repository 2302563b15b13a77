"""``freevllm demo``: the whole method, offline, on a synthetic video with the tiny trained models.

It writes a video of coloured shapes, asks about the one that is visible only briefly, and
prints the answer, the frames each pathway kept (with their times and RoI boxes) and the
visual-token count next to the ground truth; the contact sheet goes into the output folder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from . import synthetic
from .render import save_contact_sheet

__all__ = ["run_demo", "DEMO_SEED"]

#: The demo's video: held out of training, its target visible only briefly, with distractors.
DEMO_SEED = synthetic.HELDOUT_SEED + 2024


def run_demo(out_dir: Path, *, seed: int = DEMO_SEED, out: TextIO = sys.stdout):
    """Run the demo, print its report to ``out``, and return the :class:`AskResult`."""
    from .cli import print_provenance

    out_dir.mkdir(parents=True, exist_ok=True)
    world = synthetic.make_video(seed, brief=True)
    video = world.write(out_dir / "demo.mp4")
    target = world.target_object
    question = synthetic.colour_qa(target).question  # "What color is the triangle?"
    qa = synthetic.tiny_pipeline()
    print(f"Video: {video} ({world.num_frames} frames, {world.duration:.1f} s, {world.size}x{world.size})", file=out)
    start, end = world.seconds(target)
    print(f"Ground truth: a {target.name} is visible from {start:.2f}s to {end:.2f}s only", file=out)
    print(f"Question: {question}", file=out)
    result = qa.ask(video, question)
    print(f"Answer: {result.answer}", file=out)
    print_provenance(result, out=out)
    images = dict(enumerate(world.render()))
    sheet = save_contact_sheet(result, images, out_dir / "contact_sheet.png", thumb_width=128)
    print(f"Contact sheet: {sheet}", file=out)
    return result
