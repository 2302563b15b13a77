"""Pre-fill latency and output tokens/s of LLaVA-NeXT-7B for 2648, 3680 and 28,800 visual tokens.

The paper (Free Video-LLM, arXiv 2410.10441) reports 0.578 s pre-fill and 20.4 output tokens/s
with 2648 visual tokens on the 7B. This script builds the same architecture with random
weights (``LlavaNextConfig()`` defaults: CLIP ViT-L/14-336 + a Llama-7B text model, here with
the 4096-position context and 32064-token vocabulary of ``llava-hf/llava-v1.6-vicuna-7b-hf``)
directly on the GPU in bf16, and times the answerer's own path: random visual embeddings of
the model's width spliced at the prompt's placeholder, dynamic RoPE factor 2, greedy decoding
with the key-value cache. Weights being random changes nothing in the timing; a word-level
fake tokenizer stands in for Vicuna's.

28,800 tokens (50 frames x 576) exceed the 7B's context (4096 x 2 = 8192): that row is
measured anyway, past the answerer's context check, and marked as such.

    python benchmarks/gpu_prefill.py --out prefill.json          # on a CUDA machine
    python benchmarks/gpu_prefill.py --tiny --out tiny.json      # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from freevllm_tools.answerer import LlavaAnswerer  # noqa: E402

PAPER = {"visual_tokens": 2648, "prefill_s": 0.578, "tokens_per_s": 20.4}
FULL_VISUAL_TOKENS = (2648, 3680, 28_800)
TINY_VISUAL_TOKENS = tuple(n // 8 for n in FULL_VISUAL_TOKENS)
QUESTION = "What is the man doing in the video and why?"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VICUNA_VOCAB = 32064
IMAGE_TOKEN_ID = 32000


def fake_tokenizer(vocab_size: int = VICUNA_VOCAB, image_token_id: int = IMAGE_TOKEN_ID):
    """A word-level tokenizer covering every id of the model's vocabulary (so that any
    generated id decodes), with ``<image>`` at ``image_token_id``; built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from freevllm_tools.answerer import ANSWER_PRIMER, INSTRUCTION, SYSTEM_PROMPT

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = sorted(set(f"{SYSTEM_PROMPT} USER: ASSISTANT: {INSTRUCTION} {QUESTION} {ANSWER_PRIMER}".split()))
    vocab: dict[str, int] = {}
    for token in [*specials, *words]:
        vocab.setdefault(token, len(vocab))
    filler = 0
    while len(vocab) < vocab_size:
        if len(vocab) == image_token_id:
            vocab["<image>"] = image_token_id
            continue
        vocab[f"w{filler}"] = len(vocab)
        filler += 1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_full(device: torch.device, dtype: torch.dtype, config: Any = None) -> LlavaAnswerer:
    """The 7B architecture (or ``config``), random weights, built in place on ``device`` in ``dtype``."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = config if config is not None else LlavaNextConfig()
    config.text_config.max_position_embeddings = 4096
    config.text_config.vocab_size = VICUNA_VOCAB
    config.text_config.pad_token_id = 0
    config.image_token_index = IMAGE_TOKEN_ID
    tokenizer = fake_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.eval()  # already on device in dtype (RoPE frequencies stay float32)
    return LlavaAnswerer.from_model(
        model,
        tokenizer,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        identity="random-llava-next-7b",
        rope_scaling_factor=2.0,
        max_context=10**7,  # measured past the real context too; rows are marked
    )


def build_tiny() -> LlavaAnswerer:
    from freevllm_tools.testing import tiny_llava_next

    answerer = tiny_llava_next(seed=0, rope_scaling_factor=2.0)
    answerer.max_context = 10**7
    return answerer


def measure(
    answerer: LlavaAnswerer, num_visual: int, *, repeats: int, new_tokens: int, context: int
) -> dict[str, Any]:
    """Median pre-fill seconds and output tokens/s over ``repeats`` runs (after one warm-up)."""
    device = answerer.device
    generator = torch.Generator(device=device).manual_seed(num_visual)
    tokens = torch.randn(num_visual, answerer.hidden_size, generator=generator, device=device)
    tokens = tokens.to(answerer.dtype)
    answerer.answer(QUESTION, tokens, max_new_tokens=2)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [answerer.answer(QUESTION, tokens, max_new_tokens=new_tokens) for _ in range(repeats)]
    prefill = [run.prefill_s for run in runs]
    speed = [run.tokens_per_s for run in runs]  # tokens after the first / decoding seconds
    overall = [run.num_new_tokens / (run.prefill_s + run.generate_s) for run in runs]
    row = {
        "visual_tokens": num_visual,
        "num_prompt_tokens": runs[0].num_prompt_tokens,
        "new_tokens": runs[0].num_new_tokens,
        "prefill_s_median": statistics.median(prefill),
        "prefill_s_all": prefill,
        "tokens_per_s_median": statistics.median(speed),
        "tokens_per_s_all": speed,
        "end_to_end_tokens_per_s_median": statistics.median(overall),
        "within_context": runs[0].num_prompt_tokens + new_tokens <= context,
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def markdown(rows: list[dict[str, Any]], *, context: int) -> str:
    lines = [
        "| visual tokens | prompt tokens | pre-fill (s, median) | output tokens/s (median) "
        "| within context |",
        "| ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in rows:
        mark = "yes" if row["within_context"] else f"no (> {context})"
        lines.append(
            f"| {row['visual_tokens']:,} | {row['num_prompt_tokens']:,} | {row['prefill_s_median']:.3f} "
            f"| {row['tokens_per_s_median']:.1f} | {mark} |"
        )
    lines.append(
        f"| paper, {PAPER['visual_tokens']:,} | | {PAPER['prefill_s']:.3f} | {PAPER['tokens_per_s']:.1f} | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (smoke test)")
    parser.add_argument("--visual-tokens", type=int, nargs="+", help="visual sequence lengths to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per length (median reported)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to generate per run")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.tiny:
        started = time.perf_counter()
        answerer = build_tiny()
        lengths = args.visual_tokens or TINY_VISUAL_TOKENS
        device_name = f"CPU ({platform.processor() or platform.machine()})"
    else:
        if not torch.cuda.is_available():
            print(
                "gpu_prefill: no CUDA GPU here; nothing measured "
                "(use --tiny to smoke-test the script on a CPU)"
            )
            return 0
        device = torch.device("cuda")
        started = time.perf_counter()
        answerer = build_full(device, getattr(torch, args.dtype))
        lengths = args.visual_tokens or FULL_VISUAL_TOKENS
        device_name = torch.cuda.get_device_name(device)
    build_s = time.perf_counter() - started
    answerer.eos_token_ids = set()  # random weights: always generate the full --new-tokens

    # The answerer's context check is lifted for timing; this is the limit it would enforce.
    context = int(answerer.max_position_embeddings * answerer.rope_scaling_factor)
    rows = [
        measure(answerer, n, repeats=args.repeats, new_tokens=args.new_tokens, context=context)
        for n in lengths
    ]
    table = markdown(rows, context=context)
    print(f"LLaVA-NeXT {'tiny' if args.tiny else '7B'} (random weights), {device_name}, {answerer.dtype}, "
          f"dynamic RoPE x{answerer.rope_scaling_factor:g}, built in {build_s:.1f} s\n")
    print(table)
    if args.out:
        import transformers

        report = {
            "model": "tiny LLaVA-NeXT" if args.tiny else "LLaVA-NeXT-7B (LlavaNextConfig defaults)",
            "device": device_name,
            "dtype": str(answerer.dtype).removeprefix("torch."),
            "rope": {"type": "dynamic", "factor": answerer.rope_scaling_factor},
            "context": context,
            "repeats": args.repeats,
            "build_s": build_s,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "paper": PAPER,
            "results": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
