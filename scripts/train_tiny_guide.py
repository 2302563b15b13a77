"""Train the synthetic world's tiny CLIP guide into freevllm_tools/assets/tiny_guide.

    .venv/bin/python scripts/train_tiny_guide.py [--steps N] [--out DIR]

Fixed seed; a few minutes on two CPU cores. Prints a JSON line every ``--log-every`` steps and
the held-out evaluation at the end.
"""

from __future__ import annotations

import argparse
import json

from freevllm_tools import synthetic
from freevllm_tools.training import (
    GUIDE_DIR,
    GuideTrainingConfig,
    evaluate_guide,
    train_guide,
)


def main() -> None:
    defaults = GuideTrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(GUIDE_DIR))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--shape-weight", type=float, default=defaults.shape_weight)
    parser.add_argument("--eval-videos", type=int, default=100)
    args = parser.parse_args()
    cfg = GuideTrainingConfig(
        steps=args.steps, seed=args.seed, threads=args.threads, log_every=args.log_every, shape_weight=args.shape_weight
    )
    summary = train_guide(args.out, cfg, log=lambda line: print(line, flush=True))
    print(json.dumps({"trained": summary["seconds"]}), flush=True)

    from freevllm_tools.guide import ClipGuide

    guide = ClipGuide.from_pretrained(args.out, device="cpu")
    videos = synthetic.make_videos(range(synthetic.HELDOUT_SEED, synthetic.HELDOUT_SEED + args.eval_videos))
    report = evaluate_guide(guide, videos)
    print(json.dumps({"heldout": report.to_dict()}), flush=True)


if __name__ == "__main__":
    main()
