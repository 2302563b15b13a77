"""Training the tiny models of the synthetic world (``freevllm_tools.synthetic``).

Two models are trained here, each in minutes on two CPU cores with a fixed seed, and shipped in
``freevllm_tools/assets``:

* a tiny CLIP **guide** (an open_clip ViT config at the world's 64x64 frames, 8x8 patches, with a
  word-level tokenizer) trained with a sigmoid (SigLIP-style) loss on two levels: the pooled image
  embedding against every query text ("a red square", "a circle", "What shape is the red
  object?"), and every *patch* token (after the visual projection, as the guide reads them)
  against the same texts, with soft targets that are 1 on the patches an object covers and fall
  off with the distance from it. The patch term is what makes ``token_scores`` peak on the
  object, so the RoI crop lands on it. An auxiliary linear head (dropped after training) reads
  each covered patch's colour and shape from its token, so that patch tokens carry the shape too.
* a tiny **answerer** (a transformers LLaVA-family model, see :func:`train_answerer`).

The scripts ``scripts/train_tiny_guide.py`` and ``scripts/train_tiny_answerer.py`` call these
functions; nothing here runs at import time.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import synthetic as S
from .config import sample_frame_indices

__all__ = [
    "ANSWERER_DIR",
    "GUIDE_DIR",
    "GUIDE_MODEL_CONFIG",
    "AnswererModelConfig",
    "AnswererTrainingConfig",
    "GuideReport",
    "GuideTrainingConfig",
    "answerer_tokenizer",
    "answerer_training_mixture",
    "build_tiny_answerer",
    "evaluate_answerer",
    "evaluate_guide",
    "guide_forward",
    "guide_vision_to_clip_vision",
    "simulate_codec",
    "train_answerer",
    "train_guide",
    "word_tokenizer",
]

GUIDE_DIR = S.TINY_GUIDE_DIR
ANSWERER_DIR = S.TINY_ANSWERER_DIR

GUIDE_SPECIALS = ("[PAD]", "[UNK]")
GUIDE_EOS = "[EOS]"


# -- tokenizers ------------------------------------------------------------------------------


def word_tokenizer(
    words: Sequence[str],
    *,
    specials: Sequence[str] = GUIDE_SPECIALS,
    eos: str | None = GUIDE_EOS,
    extra_specials: Sequence[str] = (),
    add_eos: bool = True,
    **tokenizer_kwargs: Any,
) -> Any:
    """A word-level ``transformers`` fast tokenizer over ``words`` (lower-cased, punctuation split).

    Ids: ``specials`` first (``[PAD]`` = 0, ``[UNK]`` = 1), then the words, the ``extra_specials``,
    and ``eos`` last, so that it has the largest id (open_clip's ``argmax`` text pooling picks the
    end-of-text token that way). ``add_eos`` appends ``eos`` to every encoded text.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*specials, *sorted(set(words) | {".", ",", "?", "!", ":", "'"}), *extra_specials]:
        vocab.setdefault(token, len(vocab))
    if eos is not None:
        vocab.setdefault(eos, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_eos and eos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])]
        )
    tok.decoder = decoders.WordPiece(prefix="##")
    kwargs: dict[str, Any] = {"pad_token": specials[0], "unk_token": "[UNK]"}
    if eos is not None:
        kwargs["eos_token"] = eos
    if extra_specials and "extra_special_tokens" not in tokenizer_kwargs:
        kwargs["additional_special_tokens"] = list(extra_specials)
    kwargs.update(tokenizer_kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


# -- augmentation ----------------------------------------------------------------------------


def simulate_codec(frames: np.ndarray, rng: np.random.Generator, *, noise: float = 1.5) -> np.ndarray:
    """What yuv420p encoding does to ``(T, H, W, 3)`` uint8 frames, roughly and fast.

    RGB -> YCbCr (BT.601), chroma averaged over 2x2 blocks and brought back bilinearly-ish
    (nearest, then a 3-tap blur), a little Gaussian noise, back to RGB.
    """
    x = frames.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = (b - y) * 0.564
    cr = (r - y) * 0.713
    t, h, w = y.shape
    chroma = []
    for c in (cb, cr):
        small = c.reshape(t, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
        up = small.repeat(2, axis=1).repeat(2, axis=2)
        up[:, 1:-1] = 0.25 * up[:, :-2] + 0.5 * up[:, 1:-1] + 0.25 * up[:, 2:]
        up[:, :, 1:-1] = 0.25 * up[:, :, :-2] + 0.5 * up[:, :, 1:-1] + 0.25 * up[:, :, 2:]
        chroma.append(up)
    cb, cr = chroma
    y = y + rng.normal(0, noise, size=y.shape).astype(np.float32)
    out = np.stack([y + 1.403 * cr, y - 0.344 * cb - 0.714 * cr, y + 1.773 * cb], axis=-1)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# -- the guide -------------------------------------------------------------------------------

#: The tiny guide's open_clip model config (the vocabulary size is set from the tokenizer).
GUIDE_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {
        "context_length": 24,
        "vocab_size": 0,
        "width": 64,
        "heads": 4,
        "layers": 2,
        "mlp_ratio": 2.0,
        "hf_tokenizer_name": "freevllm-tiny-words",
    },
}


@dataclass
class GuideTrainingConfig:
    """Hyper-parameters of :func:`train_guide`."""

    steps: int = 1500
    batch_videos: int = 8
    frames_per_video: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    patch_weight: float = 1.0
    caption_weight: float = 0.0
    """Weight of a patch-level contrastive term: each patch an object covers picks that
    object's caption ("a red square") among all colour-shape captions (a softmax over them).
    Off in the shipped guide: tried at 1.0 on the first (off-grid, drifting) world, it barely
    put shape into single patches (a linear probe of shape from a patch token went from 31% to
    35%, chance 25%) and it weakened the frame-level colour-shape binding."""
    shape_weight: float = 1.0
    """Weight of an auxiliary classifier (a linear head, not kept) that reads each covered
    patch's colour and shape from its projected token: it makes the patch tokens themselves
    carry the shape, which the answerer (whose vision tower is this ViT) needs."""
    seed: int = 0
    threads: int = 1
    log_every: int = 50


def _guide_queries() -> list[tuple[str | None, str | None]]:
    return S.guide_texts()


def _query_matches(query: tuple[str | None, str | None], obj: S.SceneObject) -> bool:
    colour, shape = query
    return (colour is None or colour == obj.colour) and (shape is None or shape == obj.shape)


def guide_forward(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled ``(B, D)`` and projected patch tokens ``(B, h*w, D)``, unnormalised, exactly as
    :meth:`freevllm_tools.guide.ClipGuide._forward` computes them (but with gradients)."""
    visual = model.visual
    out = visual.forward_intermediates(pixels, indices=1, normalize_intermediates=True, output_fmt="NLC")
    return out["image_features"], out["image_intermediates"][-1] @ visual.proj


def _patch_target(
    mask: np.ndarray, box: tuple[int, int, int, int], grid: int, patch: int, sigma: float = 0.9
) -> np.ndarray:
    """``(grid, grid)`` soft target of one object: 1 on patches it covers (>= 20%), falling off
    as ``exp(-d^2 / 2 sigma^2)`` with the distance ``d`` (in patches) from its box elsewhere, so
    that token scores rank nearby patches above far ones and a top-k centre stays on it."""
    coverage = mask.reshape(grid, patch, grid, patch).mean(axis=(1, 3))
    centres = (np.arange(grid) + 0.5) * patch
    x0, y0, x1, y1 = box
    dx = np.maximum.reduce([x0 - centres, np.zeros(grid), centres - x1]) / patch
    dy = np.maximum.reduce([y0 - centres, np.zeros(grid), centres - y1]) / patch
    falloff = np.exp(-(dy[:, None] ** 2 + dx[None, :] ** 2) / (2 * sigma**2))
    return np.where(coverage >= 0.2, 1.0, np.minimum(falloff, 0.9) * (coverage > 0) + falloff * 0.5 * (coverage == 0)).astype(np.float32)


def _batch_frames(
    rng: np.random.Generator, cfg: GuideTrainingConfig, size: int, grid: int
) -> tuple[np.ndarray, list[list[S.SceneObject]], list[np.ndarray]]:
    """Frames (B, H, W, 3), the objects visible in each, and each object's patch coverage."""
    frames, visible, coverage = [], [], []
    patch = size // grid
    for _ in range(cfg.batch_videos):
        video = S.make_video(int(rng.integers(S.HELDOUT_SEED)), size=size)
        objects = video.objects
        picks = []
        for _k in range(cfg.frames_per_video):
            if rng.random() < 0.75:
                obj = objects[int(rng.integers(len(objects)))]
                picks.append(int(rng.integers(obj.start, obj.end)))
            else:
                picks.append(int(rng.integers(video.num_frames)))
        frames.append(video.render(picks))
        for i in picks:
            vis = [o for o in objects if o.visible(i)]
            masks = video.masks(i)
            cov = [_patch_target(masks[o.name], o.box(i), grid, patch) for o in vis]
            visible.append(vis)
            coverage.append(np.stack(cov) if cov else np.zeros((0, grid, grid), np.float32))
    return np.concatenate(frames), visible, coverage


def train_guide(
    out_dir: str | os.PathLike[str] = GUIDE_DIR,
    cfg: GuideTrainingConfig | None = None,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the tiny guide and save it to ``out_dir`` (open_clip layout, fp16 safetensors,
    word-level tokenizer). Returns a summary (steps, seconds, final losses)."""
    import open_clip
    from safetensors.torch import save_file

    cfg = cfg or GuideTrainingConfig()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = word_tokenizer(S.VOCABULARY)
    model_cfg = json.loads(json.dumps(GUIDE_MODEL_CONFIG))
    model_cfg["text_cfg"]["vocab_size"] = len(tokenizer)
    model = open_clip.CLIP(**model_cfg)
    size = model_cfg["vision_cfg"]["image_size"]
    grid = size // model_cfg["vision_cfg"]["patch_size"]
    context = model_cfg["text_cfg"]["context_length"]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    queries = _guide_queries()
    # learnable temperature and bias of the two sigmoid losses (not part of the guide)
    head = torch.nn.Parameter(torch.tensor([math.log(10.0), -5.0, math.log(10.0), -5.0]))
    classifier = torch.nn.Linear(model_cfg["embed_dim"], len(S.COLOURS_LIST) + len(S.SHAPES))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    optim = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay + [head, *classifier.parameters()], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim,
        lambda s: min(1.0, (s + 1) / cfg.warmup)
        * 0.5
        * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))),
    )
    model.train()
    started = time.perf_counter()
    history: list[dict[str, float]] = []
    for step in range(cfg.steps):
        frames, visible, coverage = _batch_frames(rng, cfg, size, grid)
        if rng.random() < 0.8:
            frames = simulate_codec(frames, rng)
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)
        pixels = (pixels - mean) / std
        texts = [S.random_guide_text(c, s, rng) for c, s in queries]
        ids = tokenizer(texts, padding="max_length", max_length=context, truncation=True, return_tensors="pt").input_ids

        pooled, patches = guide_forward(model, pixels)
        text = F.normalize(model.encode_text(ids), dim=-1)
        pooled = F.normalize(pooled, dim=-1)
        patches = F.normalize(patches, dim=-1)

        # labels: frame-level (B, Q) and patch-level (B, P, Q) with an ignore band
        b, q, p = len(visible), len(queries), grid * grid
        frame_labels = torch.zeros(b, q)
        patch_target = torch.zeros(b, p, q)
        for i, (objs, cov) in enumerate(zip(visible, coverage)):
            for j, query in enumerate(queries):
                match = [k for k, o in enumerate(objs) if _query_matches(query, o)]
                if not match:
                    continue
                frame_labels[i, j] = 1.0
                patch_target[i, :, j] = torch.from_numpy(cov[match].max(axis=0).reshape(-1))
        frame_logits = head[0].exp() * pooled @ text.T + head[1]
        frame_loss = F.binary_cross_entropy_with_logits(frame_logits, frame_labels)
        patch_logits = head[2].exp() * patches @ text.T + head[3]
        per = F.binary_cross_entropy_with_logits(patch_logits, patch_target, reduction="none")
        # the covered patches weigh as much, in all, as the rest
        positive = (patch_target >= 1.0).float()
        pos_loss = (per * positive).sum() / positive.sum().clamp(min=1)
        neg_loss = (per * (1 - positive)).sum() / (1 - positive).sum().clamp(min=1)
        loss = frame_loss + cfg.patch_weight * 0.5 * (pos_loss + neg_loss)
        # patch-level contrastive term over the full captions (the first len(full) queries)
        full = [j for j, (c, sh) in enumerate(queries) if c and sh]
        owner_rows, owner_cols, owner_labels, owner_objects = [], [], [], []
        for i, (objs, cov) in enumerate(zip(visible, coverage)):
            for k, obj in enumerate(objs):
                cells = np.flatnonzero(cov[k].reshape(-1) >= 1.0)
                owner_rows += [i] * len(cells)
                owner_cols += cells.tolist()
                owner_labels += [full.index(queries.index((obj.colour, obj.shape)))] * len(cells)
                owner_objects += [(i, k)] * len(cells)
        if owner_rows and cfg.shape_weight > 0:
            objects = [visible[i][k] for i, k in owner_objects]
            logits = classifier(patches[owner_rows, owner_cols])
            colour_target = torch.tensor([S.COLOURS_LIST.index(o.colour) for o in objects])
            shape_target = torch.tensor([S.SHAPES.index(o.shape) for o in objects])
            shape_loss = F.cross_entropy(logits[:, : len(S.COLOURS_LIST)], colour_target) + F.cross_entropy(
                logits[:, len(S.COLOURS_LIST) :], shape_target
            )
            loss = loss + cfg.shape_weight * shape_loss
        if owner_rows and cfg.caption_weight > 0:
            caption_logits = head[2].exp() * patches[owner_rows, owner_cols] @ text[full].T
            caption_loss = F.cross_entropy(caption_logits, torch.tensor(owner_labels))
            loss = loss + cfg.caption_weight * caption_loss

        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            record = {
                "step": step,
                "loss": float(loss),
                "frame": float(frame_loss),
                "patch_pos": float(pos_loss),
                "patch_neg": float(neg_loss),
                "seconds": time.perf_counter() - started,
            }
            history.append(record)
            log(json.dumps(record))

    model.eval()
    seconds = time.perf_counter() - started
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.fspath(out / "open_clip_model.safetensors"))
    config = {
        "name": "freevllm-tiny-guide",
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "size": [size, size],
            "mode": "RGB",
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bilinear",
            "resize_mode": "squash",
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    tokenizer.save_pretrained(out)
    summary = {"steps": cfg.steps, "seconds": round(seconds, 1), "last": history[-1], "config": cfg.__dict__}
    (out / "training.json").write_text(json.dumps(summary, indent=2), "utf-8")
    return summary


# -- evaluating the guide ----------------------------------------------------------------------


def sampled_visibility(video: S.SyntheticVideo, obj: S.SceneObject, num_frames: int = 50) -> np.ndarray:
    """(T,) bool over the sampled frames: where ``obj`` is visible."""
    idx = sample_frame_indices(video.num_frames, num_frames)
    return video.visible_frames(obj)[idx]


@dataclass
class GuideReport:
    """How well a guide picks the frames and regions a question names (see :func:`evaluate_guide`)."""

    videos: int
    slow_hit: float
    """Share of videos whose slow-pathway frames are all frames where the object is visible
    (or, when it is visible in fewer sampled frames than the pathway keeps, include all of them)."""
    top1_hit: float
    """Share of videos whose best-scoring frame shows the object."""
    roi_hit: float
    """Share of slow-pathway frames showing the object whose RoI box holds at least half of it."""
    roi_hit_tight: float
    """The same with a tight box (``tight_ratio`` of the pooled grid)."""
    roi_hit_chance: float
    """The same tight box placed at random: what a guide that knows nothing would score."""

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def evaluate_guide(
    guide: Any,
    videos: Sequence[S.SyntheticVideo],
    *,
    text: Callable[[S.SyntheticVideo], str] = lambda v: f"a {v.target_object.name}",
    frames: Callable[[S.SyntheticVideo], tuple[np.ndarray, np.ndarray]] | None = None,
    config: Any = None,
    grid: tuple[int, int] = (8, 8),
    tight_ratio: float = 0.25,
    seed: int = 0,
) -> GuideReport:
    """Score a :class:`~freevllm_tools.guide.ClipGuide` on ``videos``, asking ``text(video)``
    about each video's target. ``frames(video)`` gives the sampled frames ``(T, H, W, 3)`` and
    their frame numbers (default: rendered frames at the paper's 50-frame sampling, through
    :func:`simulate_codec`). ``config`` is the perception config (default: the paper's)."""
    from dataclasses import replace

    from . import perception
    from .config import PerceptionConfig

    config = config or PerceptionConfig.paper()
    tight = replace(config, slow=replace(config.slow, roi_ratio=tight_ratio))
    rng = np.random.default_rng(seed)
    slow_hits = top1_hits = 0
    roi = roi_tight = roi_chance = roi_total = 0
    for video in videos:
        if frames is None:
            idx = np.asarray(sample_frame_indices(video.num_frames, config.num_frames))
            images = simulate_codec(video.render(idx), np.random.default_rng(video.seed))
        else:
            images, idx = frames(video)
        target = video.target_object
        visible = video.visible_frames(target)[idx]
        features = guide.encode_frames(images)
        embedding = guide.encode_text([text(video)])[0]
        plans = [perception.plan(c, features.pooled, features.dense, embedding, grid) for c in (config, tight)]
        slow = plans[0].pathways["slow"]
        chosen = visible[slow.frames]
        need = min(len(slow.frames), int(visible.sum()))
        slow_hits += int(chosen.sum() >= need)
        top1_hits += int(visible[int(plans[0].frame_scores.argmax())])
        size = (video.size, video.size)
        tight_slow = plans[1].pathways["slow"]
        for position, box, tight_box in zip(slow.frames, slow.boxes, tight_slow.boxes):
            if not visible[position]:
                continue
            obj_box = target.box(int(idx[position]))
            roi_total += 1
            roi += int(_covers(box.to_pixels(slow.grid, size), obj_box))
            roi_tight += int(_covers(tight_box.to_pixels(slow.grid, size), obj_box))
            gh, gw = slow.grid
            top = int(rng.integers(0, gh - tight_box.height + 1))
            left = int(rng.integers(0, gw - tight_box.width + 1))
            chance = type(tight_box)(top, left, top + tight_box.height, left + tight_box.width)
            roi_chance += int(_covers(chance.to_pixels(slow.grid, size), obj_box))
    n = max(1, len(videos))
    r = max(1, roi_total)
    return GuideReport(len(videos), slow_hits / n, top1_hits / n, roi / r, roi_tight / r, roi_chance / r)


def _covers(box: tuple[int, int, int, int], obj_box: tuple[int, int, int, int], share: float = 0.5) -> bool:
    """Whether pixel box ``box`` holds at least ``share`` of the object's box."""
    x0, y0, x1, y1 = box
    ox0, oy0, ox1, oy1 = obj_box
    inter = max(0, min(x1, ox1) - max(x0, ox0)) * max(0, min(y1, oy1) - max(y0, oy0))
    return inter >= share * (ox1 - ox0) * (oy1 - oy0)


# -- the answerer ------------------------------------------------------------------------------
# A LLaVA-NeXT model (CLIP vision tower + Llama + a word-level tokenizer). Its vision tower is the
# tiny guide's ViT converted to transformers' CLIPVisionModel and kept frozen, as LLaVA's tower is
# a CLIP ViT: so its patch tokens already know colours, shapes and places, and training only
# teaches the projector and the language model to read them.

ANSWERER_SPECIALS = ("<pad>", "<unk>")
ANSWERER_EXTRA = ("<image>",)
ANSWERER_EOS = "</s>"


def answerer_vocabulary() -> list[str]:
    """Every word of the answerer's prompt (system prompt, timing sentence, instruction,
    primer), the digits and punctuation of its times, and the world's words."""
    from . import answerer

    timing = answerer.timing_context([1.0, 2.0], 3.0)
    text = f"{answerer.SYSTEM_PROMPT} {timing} {answerer.INSTRUCTION} {answerer.ANSWER_PRIMER} user assistant question"
    return sorted(set(S.answer_words(text)) | set(S.VOCABULARY) | set("0123456789;"))


def video_timing(video: S.SyntheticVideo, indices: np.ndarray, plan: Any) -> str:
    """The prompt's timing sentence for ``plan`` over ``video``'s sampled frames ``indices``
    (the one :class:`~freevllm_tools.pipeline.FreeVideoLLM` writes for the video's file)."""
    from .answerer import timing_context

    return timing_context([video.timestamp(int(indices[i])) for i in plan.key_frames], video.duration)


def answerer_tokenizer() -> Any:
    """The tiny answerer's word-level tokenizer: ``<pad>`` 0, ``<unk>`` 1, words, ``<image>``,
    ``</s>`` (end of sequence, no BOS), left padding."""
    tok = word_tokenizer(
        answerer_vocabulary(),
        specials=ANSWERER_SPECIALS,
        eos=ANSWERER_EOS,
        extra_specials=ANSWERER_EXTRA,
        add_eos=False,
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )
    return tok


def guide_vision_to_clip_vision(visual: torch.nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    """An open_clip ``VisionTransformer`` as a transformers ``CLIPVisionConfig`` and state dict.

    The two compute the same function (pre-norm blocks, exact GELU, eps 1e-5); transformers'
    ``hidden_states[-1]`` is open_clip's residual stream before ``ln_post``.
    """
    from transformers import CLIPVisionConfig

    state = {k: v.detach().float() for k, v in visual.state_dict().items()}
    width = state["conv1.weight"].shape[0]
    patch = state["conv1.weight"].shape[-1]
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})
    heads = visual.transformer.resblocks[0].attn.num_heads
    mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    act = type(visual.transformer.resblocks[0].mlp.gelu).__name__
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        image_size=int(visual.image_size[0]),
        patch_size=patch,
        hidden_act="quick_gelu" if act == "QuickGELU" else "gelu",
        layer_norm_eps=1e-5,
        projection_dim=int(visual.proj.shape[1]),
    )
    out = {
        "vision_model.embeddings.class_embedding": state["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["ln_post.weight"],
        "vision_model.post_layernorm.bias": state["ln_post.bias"],
    }
    for i in blocks:
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        q, k, v = state[src + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[src + "attn.in_proj_bias"].chunk(3)
        out.update(
            {
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.q_proj.bias": qb,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.k_proj.bias": kb,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.v_proj.bias": vb,
                dst + "self_attn.out_proj.weight": state[src + "attn.out_proj.weight"],
                dst + "self_attn.out_proj.bias": state[src + "attn.out_proj.bias"],
                dst + "layer_norm1.weight": state[src + "ln_1.weight"],
                dst + "layer_norm1.bias": state[src + "ln_1.bias"],
                dst + "layer_norm2.weight": state[src + "ln_2.weight"],
                dst + "layer_norm2.bias": state[src + "ln_2.bias"],
                dst + "mlp.fc1.weight": state[src + "mlp.c_fc.weight"],
                dst + "mlp.fc1.bias": state[src + "mlp.c_fc.bias"],
                dst + "mlp.fc2.weight": state[src + "mlp.c_proj.weight"],
                dst + "mlp.fc2.bias": state[src + "mlp.c_proj.bias"],
            }
        )
    return config, out


@dataclass
class AnswererModelConfig:
    """Sizes of the tiny answerer's language model."""

    hidden_size: int = 96
    intermediate_size: int = 192
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048


def build_tiny_answerer(guide: Any, sizes: AnswererModelConfig | None = None, *, seed: int = 0) -> Any:
    """A LLaVA-NeXT :class:`~freevllm_tools.answerer.LlavaAnswerer` whose vision tower is
    ``guide``'s ViT (a :class:`~freevllm_tools.guide.ClipGuide`), with a fresh projector and
    Llama language model (random, from ``seed``), and :func:`answerer_tokenizer`."""
    from transformers import (
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    from .answerer import LlavaAnswerer
    from .testing import llava_next_processor

    sizes = sizes or AnswererModelConfig()
    tokenizer = answerer_tokenizer()
    vision_config, vision_state = guide_vision_to_clip_vision(guide.model.visual)
    image_size = vision_config.image_size
    patch = vision_config.patch_size
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=sizes.num_attention_heads,
        num_key_value_heads=sizes.num_attention_heads,
        max_position_embeddings=sizes.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    pinpoints = [[image_size, image_size]]
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config).eval()
    tower = model.model.vision_tower
    if not any(k.startswith("vision_model.") for k in tower.state_dict()):
        vision_state = {k.removeprefix("vision_model."): v for k, v in vision_state.items()}
    missing, unexpected = tower.load_state_dict(vision_state, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise RuntimeError(f"vision tower conversion: missing {missing[:4]}, unexpected {unexpected[:4]}")
    mean = tuple(float(v) for v in guide.preprocess_cfg.get("mean"))
    std = tuple(float(v) for v in guide.preprocess_cfg.get("std"))
    processor = llava_next_processor(tokenizer, image_size, patch, mean, std, pinpoints)
    return LlavaAnswerer.from_model(
        model, tokenizer, image_mean=mean, image_std=std, rope_scaling_factor=2.0, processor=processor
    )


def answerer_training_mixture() -> list[tuple[str, Any, float]]:
    """``(label, PerceptionConfig, weight)``: the visual sequences the answerer learns to read.

    The tiny preset (the demo's) most, and the configurations the benchmark compares (paper
    preset, paper split at smaller budgets, guided and uniform frame selection with full tokens),
    so that every configuration it reports is one the model was trained on.
    """
    from .config import PerceptionConfig

    grid = S.TINY_GRID
    mixture: list[tuple[str, Any, float]] = [("tiny", S.tiny_config(), 0.30), ("paper", PerceptionConfig.paper(), 0.05)]
    for budget, w in ((256, 0.06), (512, 0.05)):
        mixture.append((f"budget-{budget}", PerceptionConfig.for_budget(budget, 50, grid), w))
    for k, w in ((1, 0.05), (2, 0.06), (4, 0.06), (8, 0.05)):
        mixture.append((f"guided-{k}", S.guided_config(k), w))
        mixture.append((f"uniform-{k}", S.uniform_config(k), w))
    return mixture


@dataclass
class AnswererTrainingConfig:
    """Hyper-parameters of :func:`train_answerer`."""

    steps: int = 2400
    batch_size: int = 8
    videos: int = 800
    """Training videos; their frames are encoded once (the vision tower is frozen)."""
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0
    threads: int = 1
    log_every: int = 50
    curriculum: float = 0.2
    """Share of the steps, at the start, that use only short sequences (1-4 guided frames),
    where the object asked about is nearly always in view: the model learns to read colours
    and shapes there before it learns to search long sequences."""
    answer_weight: float = 3.0
    """Loss weight of the answer word (the colour, shape, yes/no, early/late) against the
    reply's fixed words."""
    kind_weights: dict[str, float] = field(default_factory=lambda: {"presence": 1.5})
    """Sampling weight of a question kind (``presence``, ``colour``, ``shape``, ``when``;
    default 1) against the others: yes/no questions with a colour-shape swap as the "no" are
    the hardest to learn."""
    text_batch: int = 32
    """Text-only samples a step (no visual tokens, loss on the yes/no or early/late word
    alone): a yes/no after a named object, early/late after a timing sentence. These steps
    compare words with words; with one such word in a few hundred tokens of video, the
    answerer never learnt them (it gave every yes/no and every early/late question one
    answer). Short, so cheap."""
    text_weight: float = 1.0
    """Weight of the text-only loss."""
    align_weight: float = 0.5
    """Weight of the alignment loss (LLaVA's stage 1, at the patch level): each projected patch
    token that an object covers, read through the language model's output head, names the
    object's colour and shape. It puts visual tokens in the language model's word space, so
    that the question's words can find them."""


@dataclass
class _VideoFeatures:
    video: S.SyntheticVideo
    indices: np.ndarray
    hidden: torch.Tensor  # (T, 1 + h*w, Dv) float16: the tower's last hidden state
    pooled: torch.Tensor  # (T, D) guide pooled
    dense: torch.Tensor  # (T, h, w, D) guide dense
    owner: torch.Tensor  # (T, h*w) int64: index in video.objects of the object covering a patch, -1 none


def _encode_videos(answerer: Any, guide: Any, videos: Sequence[S.SyntheticVideo], num_frames: int) -> list[_VideoFeatures]:
    """Run the shared ViT once per video; derive the guide's pooled and dense embeddings from
    the same hidden state (``ln_post`` then the projection, as ClipGuide does)."""
    visual = guide.model.visual
    grid = guide.grid_size
    out = []
    for video in videos:
        idx = np.asarray(sample_frame_indices(video.num_frames, num_frames))
        frames = simulate_codec(video.render(idx), np.random.default_rng([video.seed, 11]))
        with torch.inference_mode():
            pixels = answerer.preprocess(frames)
            hidden = answerer._vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
            normed = visual.ln_post(hidden)
            pooled = F.normalize(normed[:, 0] @ visual.proj, dim=-1)
            dense = F.normalize(normed[:, 1:] @ visual.proj, dim=-1).reshape(len(idx), *grid, -1)
        out.append(
            _VideoFeatures(video, idx, hidden.to(torch.float16), pooled.float(), dense.float(), _owners(video, idx, grid))
        )
    return out


def _owners(video: S.SyntheticVideo, indices: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """``(T, h*w)``: which object covers each patch (>= 30% of it) of each sampled frame, -1 none."""
    h, w = grid
    ph, pw = video.size // h, video.size // w
    owner = np.full((len(indices), h * w), -1, dtype=np.int64)
    for t, frame in enumerate(indices):
        for k, obj in enumerate(video.objects):
            if not obj.visible(int(frame)):
                continue
            mask = S._place(S.shape_mask(obj.shape, obj.size), obj.origin(int(frame)), video.size)
            coverage = mask.reshape(h, ph, w, pw).mean(axis=(1, 3)).reshape(-1)
            owner[t, coverage >= 0.3] = k
    return torch.from_numpy(owner)


def shown_object(
    video: S.SyntheticVideo, owner: torch.Tensor, asks: tuple[str, str] | None
) -> S.SceneObject | None:
    """The object that key frames with patch owners ``owner`` ``(K, h*w)`` show: of those
    covering a patch, the one sharing most with ``asks`` (colour, shape), then covering most."""
    counts = torch.bincount(owner[owner >= 0].flatten(), minlength=len(video.objects)).tolist()
    colour, shape = asks or (None, None)
    seen = [
        ((o.colour == colour) + (o.shape == shape), counts[k], -k)
        for k, o in enumerate(video.objects)
        if counts[k] > 0
    ]
    return video.objects[-max(seen)[2]] if seen else None


def named_object(colour: str, shape: str, rng: np.random.Generator) -> tuple[bool, S.SceneObject | None]:
    """``(present, shown)`` for a yes/no reply about (colour, shape): half the time that
    object, else one with the colour, the shape or both changed, or nothing."""
    if rng.random() < 0.5:
        return True, S.SceneObject(colour, shape, 0, 1, 16, 0.0, 0.0)
    change = int(rng.integers(4))
    other_colour = str(rng.choice([c for c in S.COLOURS_LIST if c != colour]))
    other_shape = str(rng.choice([x for x in S.SHAPES if x != shape]))
    if change == 3:
        return False, None
    named = (other_colour if change != 1 else colour, other_shape if change != 0 else shape)
    return False, S.SceneObject(*named, 0, 1, 16, 0.0, 0.0)


def text_only_example(rng: np.random.Generator) -> tuple[str, str, str]:
    """A ``(question, timing sentence, reply)`` whose answer word follows from the words alone.

    Half yes/no after "the key frames show ..." (the object asked about half the time, else one
    or both words changed, or nothing); half early/late from key-frame times drawn the way a
    guide picks them: inside the object's window, at times one of three or more astray (so
    the middle time is always inside).
    """
    from .answerer import timing_context

    n, fps = S.DEFAULT_NUM_FRAMES, S.DEFAULT_FPS
    frame_of = sample_frame_indices(n, 50)
    colour = S.COLOURS_LIST[rng.integers(len(S.COLOURS_LIST))]
    shape = S.SHAPES[rng.integers(len(S.SHAPES))]
    count = int(rng.choice([1, 2, 3, 3, 3, 4, 8]))
    if rng.random() < 0.5:
        reply = S.presence_reply(*named_object(colour, shape, rng))
        positions = sorted(rng.choice(50, size=count, replace=False).tolist())
        context = timing_context([frame_of[p] / fps for p in positions], n / fps)
        return S.presence_qa(colour, shape, ()).question, context, reply
    when = ("early", "late")[int(rng.integers(2))]
    start, end = S._window(rng, n, brief=bool(rng.random() < 0.5), when=when)
    inside = [p for p, f in enumerate(frame_of) if start <= f < end]
    positions = rng.permutation(inside)[:count].tolist()
    if len(positions) >= 3 and rng.random() < 0.1:
        positions[-1] = int(rng.choice([p for p in range(50) if p not in inside]))
    context = timing_context([frame_of[p] / fps for p in sorted(positions)], n / fps)
    qa = S.when_qa(S.SceneObject(colour, shape, start, end, 16, 0.0, 0.0), when)
    return qa.question, context, qa.reply


def check_shared_tower(answerer: Any, guide: Any, frames: np.ndarray) -> float:
    """Largest difference between ClipGuide's embeddings and those derived from the answerer's
    converted tower (they must agree: the training reads one for the other)."""
    video = S.make_video(0)
    feats = _encode_videos(answerer, guide, [video], 50)[0]
    idx = feats.indices
    frames = simulate_codec(video.render(idx), np.random.default_rng([video.seed, 11]))
    reference = guide.encode_frames(frames)
    return max(
        float((reference.pooled - feats.pooled).abs().max()),
        float((reference.dense - feats.dense).abs().max()),
    )


def train_answerer(
    guide_dir: str | os.PathLike[str] = GUIDE_DIR,
    out_dir: str | os.PathLike[str] = ANSWERER_DIR,
    cfg: AnswererTrainingConfig | None = None,
    sizes: AnswererModelConfig | None = None,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the tiny answerer on the visual sequences perception builds with the trained guide.

    For each sample: a training video, one of its questions, a configuration from
    :func:`answerer_training_mixture`; the guide plans (frames, RoI boxes) from the question,
    :func:`freevllm_tools.perception.gather` takes the planned tokens from the projected frame
    tokens, and they are spliced at the prompt's image placeholder exactly as
    :meth:`LlavaAnswerer.prepare` does. The loss is next-token cross-entropy on the reply and
    the end-of-sequence token. Saves with ``save_pretrained`` (fp16) into ``out_dir``.
    """
    from . import perception
    from .guide import ClipGuide

    cfg = cfg or AnswererTrainingConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    guide = ClipGuide.from_pretrained(os.fspath(guide_dir), device="cpu")
    answerer = build_tiny_answerer(guide, sizes, seed=cfg.seed)
    model = answerer.model
    tokenizer = answerer.tokenizer
    grid = answerer.grid_size
    mixture = answerer_training_mixture()
    weights = np.array([w for _, _, w in mixture])
    weights = weights / weights.sum()
    short = np.array([w if label in ("guided-1", "guided-2", "guided-4") else 0.0 for label, _, w in mixture])
    short = short / short.sum()
    colour_ids = {c: tokenizer.convert_tokens_to_ids(c) for c in S.COLOURS_LIST}
    shape_ids = {sh: tokenizer.convert_tokens_to_ids(sh) for sh in S.SHAPES}
    answer_ids = {
        int(i)
        for word in (*S.COLOURS_LIST, *S.SHAPES, "yes", "no", "early", "late")
        for i in tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    }

    started = time.perf_counter()
    drift = check_shared_tower(answerer, guide, np.zeros(0))
    if drift > 1e-3:
        raise RuntimeError(f"converted vision tower disagrees with the guide by {drift}")
    videos = S.make_videos(range(cfg.seed * 100_000, cfg.seed * 100_000 + cfg.videos))
    features = _encode_videos(answerer, guide, videos, 50)
    encode_s = time.perf_counter() - started
    log(json.dumps({"encoded_videos": len(features), "seconds": round(encode_s, 1), "tower_drift": drift}))

    text_cache: dict[str, torch.Tensor] = {}
    prompt_cache: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}

    def text_embedding(question: str) -> torch.Tensor:
        if question not in text_cache:
            text_cache[question] = guide.encode_text([question])[0]
        return text_cache[question]

    def prompt(question: str, context: str) -> tuple[torch.Tensor, int]:
        if (question, context) not in prompt_cache:
            ids = answerer.tokenize_prompt(question, context)
            position = int((ids == answerer.image_token_id).nonzero()[0, 0])
            prompt_cache[question, context] = (ids, position)
        return prompt_cache[question, context]

    decision_ids = {tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no", "early", "late")}

    def text_sample(generator: np.random.Generator) -> tuple[torch.Tensor, int]:
        """Prompt (placeholder dropped) + reply up to its answer word, and that word's id."""
        question, context, reply = text_only_example(generator)
        ids, position = prompt(question, context)
        words = tokenizer(" " + reply, add_special_tokens=False)["input_ids"]
        at = max(i for i, t in enumerate(words) if t in decision_ids)
        sequence = torch.cat([ids[:position], ids[position + 1 :], torch.tensor(words[:at], dtype=torch.long)])
        return sequence, int(words[at])

    vision = model.model.vision_tower
    vision.requires_grad_(False)
    projector = model.model.multi_modal_projector
    language_model = model.model.language_model
    embed = model.get_input_embeddings()
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim,
        lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))),
    )
    eos = tokenizer.eos_token_id
    model.train()
    history = []
    token_counts = []
    for step in range(cfg.steps):
        sequences, targets = [], []
        align_tokens, align_labels = [], []
        for _ in range(cfg.batch_size):
            item = features[int(rng.integers(len(features)))]
            p = short if step < cfg.curriculum * cfg.steps else weights
            label, config, _ = mixture[int(rng.choice(len(mixture), p=p))]
            qa_list = item.video.questions()
            kind_weights = np.array([cfg.kind_weights.get(q.kind, 1.0) for q in qa_list])
            qa = qa_list[int(rng.choice(len(qa_list), p=kind_weights / kind_weights.sum()))]
            plan = perception.plan(config, item.pooled, item.dense, text_embedding(qa.question), grid)
            used = sorted({f for p in plan.pathways.values() for f in p.frames})
            hidden = item.hidden[used, 1:].float()
            projected = projector(hidden).reshape(len(used), *grid, -1)
            tokens = projected.new_zeros((item.hidden.shape[0], *grid, projected.shape[-1]))
            tokens = tokens.index_copy(0, torch.tensor(used), projected)
            owner = item.owner[used]  # (U, h*w)
            covered = owner >= 0
            if covered.any():
                flat = projected.reshape(len(used), -1, projected.shape[-1])[covered]
                objects = [item.video.objects[int(k)] for k in owner[covered]]
                align_tokens.append(flat)
                align_labels.append(
                    torch.tensor([[colour_ids[o.colour], shape_ids[o.shape]] for o in objects])
                )
            visual = perception.gather(plan, tokens)
            ids, position = prompt(qa.question, video_timing(item.video, item.indices, plan))
            reply_text = qa.reply
            if qa.kind == "presence":
                shown = shown_object(item.video, item.owner[plan.key_frames], qa.asks)
                if shown is not None or qa.answer == "no":
                    reply_text = S.presence_reply(qa.answer == "yes", shown)
            reply = tokenizer(" " + reply_text, add_special_tokens=False)["input_ids"] + [eos]
            reply_ids = torch.tensor(reply)
            text = embed(ids)
            sequence = torch.cat([text[:position], visual, text[position + 1 :], embed(reply_ids[:-1])])
            sequences.append(sequence)
            targets.append((len(sequence) - len(reply), reply_ids))
            token_counts.append(int(visual.shape[0]))
        longest = max(len(s) for s in sequences)
        width = sequences[0].shape[-1]
        batch = torch.zeros(len(sequences), longest, width)
        mask = torch.zeros(len(sequences), longest, dtype=torch.long)
        for row, s in enumerate(sequences):
            batch[row, : len(s)] = s
            mask[row, : len(s)] = 1
        hidden_states = language_model(inputs_embeds=batch, attention_mask=mask).last_hidden_state
        rows, cols, labels = [], [], []
        for row, (start, reply_ids) in enumerate(targets):
            for k in range(len(reply_ids)):
                rows.append(row)
                cols.append(start + k)
                labels.append(int(reply_ids[k]))
        logits = model.lm_head(hidden_states[rows, cols])
        label_tensor = torch.tensor(labels)
        weight = torch.tensor([cfg.answer_weight if t in answer_ids else 1.0 for t in labels])
        per_token = F.cross_entropy(logits, label_tensor, reduction="none")
        loss = qa_loss = (per_token * weight).sum() / weight.sum()
        align_loss = torch.zeros(())
        if align_tokens and cfg.align_weight > 0:
            align_logits = model.lm_head(torch.cat(align_tokens))
            align_target = torch.cat(align_labels)
            align_loss = 0.5 * (
                F.cross_entropy(align_logits, align_target[:, 0]) + F.cross_entropy(align_logits, align_target[:, 1])
            )
            loss = loss + cfg.align_weight * align_loss
        text_loss = torch.zeros(())
        if cfg.text_batch and cfg.text_weight > 0:
            rows_text = [text_sample(rng) for _ in range(cfg.text_batch)]
            longest = max(len(ids) for ids, _ in rows_text)
            padded = torch.full((len(rows_text), longest), tokenizer.pad_token_id)
            text_mask = torch.zeros(len(rows_text), longest, dtype=torch.long)
            for row, (ids, _) in enumerate(rows_text):
                padded[row, : len(ids)] = ids
                text_mask[row, : len(ids)] = 1
            out = language_model(inputs_embeds=embed(padded), attention_mask=text_mask).last_hidden_state
            last = torch.tensor([len(ids) - 1 for ids, _ in rows_text])
            text_logits = model.lm_head(out[torch.arange(len(rows_text)), last])
            text_loss = F.cross_entropy(text_logits, torch.tensor([t for _, t in rows_text]))
            loss = loss + cfg.text_weight * text_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optim.step()
        schedule.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            record = {
                "step": step,
                "loss": round(float(loss.detach()), 4),
                "qa": round(float(qa_loss.detach()), 4),
                "align": round(float(align_loss.detach()), 4),
                "text": round(float(text_loss.detach()), 4),
                "mean_visual_tokens": round(float(np.mean(token_counts)), 1),
                "seconds": round(time.perf_counter() - started, 1),
            }
            token_counts.clear()
            history.append(record)
            log(json.dumps(record))

    model.eval()
    seconds = time.perf_counter() - started
    out = Path(out_dir)
    model.to(torch.float16)
    answerer.save_pretrained(out)
    model.to(torch.float32)
    summary = {
        "steps": cfg.steps,
        "seconds": round(seconds, 1),
        "encode_seconds": round(encode_s, 1),
        "last": history[-1],
        "config": cfg.__dict__,
        "sizes": (sizes or AnswererModelConfig()).__dict__,
        "guide": guide.identity,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2), "utf-8")
    return summary


# -- evaluating the answerer -------------------------------------------------------------------


def evaluate_answerer(
    answerer: Any,
    guide: Any,
    videos: Sequence[S.SyntheticVideo],
    config: Any,
    *,
    kinds: Sequence[str] | None = None,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Accuracy of ``answerer`` on every question of ``videos`` (rendered frames through
    :func:`simulate_codec`), with ``guide`` planning under ``config``. Returns overall and
    per-kind accuracy and the number of questions."""
    from . import perception

    correct: dict[str, list[bool]] = {}
    for video in videos:
        idx = np.asarray(sample_frame_indices(video.num_frames, config.num_frames))
        frames = simulate_codec(video.render(idx), np.random.default_rng([video.seed, 11]))
        feats = guide.encode_frames(frames)
        tokens = answerer.encode_frames(frames)
        for qa in video.questions():
            if kinds is not None and qa.kind not in kinds:
                continue
            text = guide.encode_text([qa.question])[0]
            result = perception.perceive(config, tokens, feats.pooled, feats.dense, text)
            context = video_timing(video, idx, result.plan)
            answer = answerer.answer(qa.question, result.tokens, context=context, max_new_tokens=max_new_tokens).text
            correct.setdefault(qa.kind, []).append(S.grade(qa, answer))
    every = [c for values in correct.values() for c in values]
    return {
        "accuracy": float(np.mean(every)) if every else 0.0,
        "questions": len(every),
        "by_kind": {k: round(float(np.mean(v)), 3) for k, v in sorted(correct.items())},
    }
