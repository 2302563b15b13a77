"""Train the synthetic world's tiny LLaVA-NeXT answerer into freevllm_tools/assets/tiny_answerer.

    .venv/bin/python scripts/train_tiny_answerer.py [--steps N] [--guide DIR] [--out DIR]

Needs the tiny guide (scripts/train_tiny_guide.py) first: the answerer's vision tower is the
guide's ViT, and it learns from the sequences perception builds with that guide. Fixed seed;
minutes on one or two CPU cores. Prints a JSON line every ``--log-every`` steps and the
held-out accuracy at the end.
"""

from __future__ import annotations

import argparse
import json

from freevllm_tools import synthetic
from freevllm_tools.training import (
    ANSWERER_DIR,
    GUIDE_DIR,
    AnswererModelConfig,
    AnswererTrainingConfig,
    evaluate_answerer,
    train_answerer,
)


def main() -> None:
    defaults = AnswererTrainingConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guide", default=str(GUIDE_DIR))
    parser.add_argument("--out", default=str(ANSWERER_DIR))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--videos", type=int, default=defaults.videos)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--layers", type=int, default=AnswererModelConfig().num_hidden_layers)
    parser.add_argument("--hidden", type=int, default=AnswererModelConfig().hidden_size)
    parser.add_argument("--eval-videos", type=int, default=40)
    args = parser.parse_args()
    cfg = AnswererTrainingConfig(
        steps=args.steps,
        videos=args.videos,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
        log_every=args.log_every,
    )
    sizes = AnswererModelConfig(
        hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers
    )
    summary = train_answerer(args.guide, args.out, cfg, sizes, log=lambda line: print(line, flush=True))
    print(json.dumps({"trained": summary["seconds"]}), flush=True)

    from freevllm_tools.answerer import LlavaAnswerer
    from freevllm_tools.guide import ClipGuide

    guide = ClipGuide.from_pretrained(args.guide, device="cpu")
    answerer = LlavaAnswerer.from_pretrained(args.out, device="cpu")
    videos = synthetic.make_videos(range(synthetic.HELDOUT_SEED, synthetic.HELDOUT_SEED + args.eval_videos))
    report = evaluate_answerer(answerer, guide, videos, synthetic.tiny_config())
    print(json.dumps({"heldout": report}), flush=True)


if __name__ == "__main__":
    main()
