"""The CLIP guide: text embeddings and pooled + dense frame embeddings, on open_clip.

Free Video-LLM scores relevance with an original CLIP (ViT-L/14 at 336 px, OpenAI weights):
frame score = cosine(question embedding, pooled image embedding); token score =
cosine(question embedding, patch token passed through CLIP's visual projection). This module
produces both embeddings; ``perception.py`` does the scoring.

Models come from open_clip's registry (``available_models()``), from a local checkpoint, from a
directory in open_clip's layout (``open_clip_config.json`` + weights, as ``save_pretrained``
writes it), from the Hugging Face Hub (``"hf-hub:org/repo"``), or from a model config (a dict or a
JSON file) for tiny and home-trained models. Nothing is downloaded that is not already cached when
``HF_HUB_OFFLINE=1``; a model that cannot be loaded raises :class:`ModelError` saying how to get it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, ModelError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PRETRAINED",
    "ClipGuide",
    "GuideFeatures",
    "available_models",
    "available_weights",
]

DEFAULT_MODEL = "ViT-L-14-336"
"""The paper's guide architecture (open_clip registry name)."""
DEFAULT_PRETRAINED = "openai"
"""The paper's guide weights (open_clip pretrained tag)."""

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
_HF_HUB_PREFIX = "hf-hub:"
_LOCAL_DIR_PREFIX = "local-dir:"
_DEFAULT_LABEL = "open_clip"

PathLike = Union[str, "os.PathLike[str]"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


@dataclass
class GuideFeatures:
    """Guide embeddings of T frames, both L2-normalised, float32 on the CPU.

    Attributes:
        pooled: ``(T, D)`` the image embedding of each frame (what CLIP matches to text).
        dense: ``(T, h, w, D)`` the patch tokens (CLS dropped) after the final layer norm,
            passed through the visual projection, on the model's ``(h, w)`` patch grid (row-major).
    """

    pooled: torch.Tensor
    dense: torch.Tensor

    def __len__(self) -> int:
        return int(self.pooled.shape[0])


def available_models() -> list[str]:
    """Architectures open_clip knows by name (its model-config registry)."""
    import open_clip

    return open_clip.list_models()


def available_weights(model_name: str | None = None) -> list[tuple[str, str]]:
    """``(architecture, pretrained tag)`` pairs open_clip can fetch, for one model or all."""
    import open_clip

    if model_name is None:
        return list(open_clip.list_pretrained())
    return [(model_name, tag) for tag in open_clip.list_pretrained_tags_by_model(model_name)]


class ClipGuide:
    """A CLIP model that embeds questions and frames for Free Video-LLM's selection and RoI crop.

    Build it with :meth:`from_pretrained` or :meth:`from_config`; the constructor wraps an
    already-built open_clip model. Only ViT visual towers are accepted, because the dense
    (per-patch) embeddings need patch tokens.

    Attributes:
        identity: stable string for cache keys: ``"name:tag"`` for registry weights, otherwise
            ``"label@<digest>"`` where the digest covers the config, preprocessing and weights.
        image_size: ``(H, W)`` pixels the model sees; frames are resized to it without cropping.
        grid_size: ``(h, w)`` patch grid of the dense embeddings.
        embed_dim: ``D``, the joint text-image embedding width.
        device, dtype: where and in what precision the model runs (outputs are float32 CPU).
        model_config: the open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``...).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_config: Mapping[str, Any] | None = None,
        identity: str | None = None,
        name: str = _DEFAULT_LABEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        from open_clip import get_model_preprocess_cfg
        from open_clip.transformer import VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            kind = type(visual).__name__ if visual is not None else "no visual tower"
            msg = (
                f"CLIP model {name!r} has a {kind} visual tower; the guide's dense (per-patch) "
                "embeddings need a ViT (open_clip VisionTransformer). Choose a ViT architecture, "
                "e.g. 'ViT-L-14-336' or 'ViT-B-16'."
            )
            raise ModelError(msg)
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            msg = (
                f"CLIP model {name!r} pools its image tokens with an attentional pooler or "
                f"pool_type={visual.pool_type!r}; the guide needs plain patch tokens "
                "(pool_type 'tok' or 'avg', no attentional_pool)."
            )
            raise ModelError(msg)
        if not hasattr(visual, "forward_intermediates"):
            msg = (
                "this open_clip has no VisionTransformer.forward_intermediates, which the guide's "
                "dense embeddings use; upgrade with `pip install -U 'open_clip_torch>=2.32'`."
            )
            raise ModelError(msg)
        if visual.proj is None:
            msg = f"CLIP model {name!r} has no visual projection; dense embeddings need one."
            raise ModelError(msg)
        _check_vocab(model, tokenizer, name)

        self.name = name
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        preprocess_cfg = dict(get_model_preprocess_cfg(model))
        self.model_config: dict[str, Any] = copy.deepcopy(dict(model_config or {}))
        if identity is None:
            identity = f"{name}@{_digest(self.model_config, preprocess_cfg, model)}"
        self.identity = identity
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer

        self.image_size: tuple[int, int] = tuple(int(s) for s in visual.image_size)  # type: ignore[assignment]
        self.grid_size: tuple[int, int] = tuple(int(s) for s in visual.grid_size)  # type: ignore[assignment]
        self.embed_dim = int(visual.proj.shape[1])
        self.preprocess_cfg = preprocess_cfg
        self.interpolation = _INTERPOLATION.get(str(preprocess_cfg.get("interpolation")), "bicubic")
        mean = preprocess_cfg.get("mean", _openai_stat("OPENAI_DATASET_MEAN"))
        std = preprocess_cfg.get("std", _openai_stat("OPENAI_DATASET_STD"))
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model_name: str | os.PathLike[str] | Mapping[str, Any] = DEFAULT_MODEL,
        pretrained: str | os.PathLike[str] | None = DEFAULT_PRETRAINED,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> ClipGuide:
        """Load a guide by architecture and weights.

        Args:
            model_name: an open_clip registry name (``available_models()``); ``"hf-hub:org/repo"``;
                a directory in open_clip's layout (``open_clip_config.json`` + weights); a model
                config as a dict or a JSON file (then ``pretrained`` is a checkpoint path or None).
            pretrained: a pretrained tag of that architecture (``available_weights(name)``), a
                local checkpoint file (``.safetensors``, or a state dict that loads with
                ``torch.load(weights_only=True)``), or None for random weights. Ignored for
                ``hf-hub:`` and directories, which carry their weights. OpenAI weights use
                QuickGELU: with a registry tag this is set for you; with a local file of OpenAI
                weights name the ``-quickgelu`` architecture (``"ViT-L-14-336-quickgelu"``).
            device: default CUDA when available, else CPU.
            dtype: default float16 on CUDA, float32 elsewhere.
            cache_dir: where tagged weights are cached (default: the Hugging Face cache).

        Raises:
            ModelError: unknown architecture, missing file, weights not cached while offline,
                or a non-ViT visual tower.
        """
        if isinstance(model_name, Mapping):
            return cls.from_config(
                model_name, _config_checkpoint(pretrained), device=device, dtype=dtype
            )
        name = os.fspath(model_name)
        if name.endswith(".json") and os.path.isfile(name):
            return cls.from_config(name, _config_checkpoint(pretrained), device=device, dtype=dtype)
        if os.path.isdir(name):
            if not os.path.isfile(os.path.join(name, CONFIG_NAME)):
                msg = (
                    f"directory {name!r} is not a saved CLIP model: it has no {CONFIG_NAME}. "
                    "Point to a directory written by ClipGuide.save_pretrained (open_clip's layout)."
                )
                raise ModelError(msg)
            name = _LOCAL_DIR_PREFIX + name
        if name.startswith((_HF_HUB_PREFIX, _LOCAL_DIR_PREFIX)):
            return cls._from_schema(name, device=device, dtype=dtype, cache_dir=cache_dir)
        return cls._from_registry(name, pretrained, device=device, dtype=dtype, cache_dir=cache_dir)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | str | os.PathLike[str],
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> ClipGuide:
        """Build a guide from an open_clip model config, with weights from ``checkpoint`` or random.

        Args:
            config: ``{"embed_dim", "vision_cfg", "text_cfg", ...}`` as in open_clip's
                ``model_configs/*.json``, or the ``{"model_cfg", "preprocess_cfg"}`` form of an
                ``open_clip_config.json``; a dict or a path to such a JSON file.
            checkpoint: a state-dict file for exactly this config (safetensors preferred; other
                files load with ``torch.load(weights_only=True)``), or None for random weights
                drawn from torch's global generator (seed it for reproducible models).
            name: label used in ``identity`` (default: the config's ``"name"``, else "open_clip").
        """
        import open_clip
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        model_cfg, preprocess_overlay, stored_name = _read_config(config)
        label = name or stored_name or _DEFAULT_LABEL
        if checkpoint is not None and not os.path.isfile(checkpoint):
            msg = (
                f"checkpoint {os.fspath(checkpoint)!r} for CLIP model {label!r} does not exist; "
                "pass the path of a saved state dict (e.g. written by ClipGuide.save_pretrained), "
                "or checkpoint=None for random weights."
            )
            raise ModelError(msg)
        build_cfg = copy.deepcopy(model_cfg)
        text_cfg = build_cfg.get("text_cfg", {})
        if "multimodal_cfg" in build_cfg:
            msg = f"CLIP model {label!r} is a CoCa config; the guide supports CLIP-style models only."
            raise ModelError(msg)
        if text_cfg.get("hf_model_name"):
            text_cfg["hf_model_pretrained"] = False  # weights come from the checkpoint, not the Hub
        if build_cfg.get("vision_cfg", {}).get("timm_model_name"):
            build_cfg["vision_cfg"]["timm_model_pretrained"] = False
        custom_text = bool(build_cfg.pop("custom_text", False)) or bool(text_cfg.get("hf_model_name"))
        model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
        try:
            model = model_class(**build_cfg)
        except Exception as error:
            msg = f"model config for CLIP model {label!r} does not build an open_clip model: {error}"
            raise ModelError(msg) from error
        if checkpoint is not None:
            try:
                open_clip.load_checkpoint(model, os.fspath(checkpoint), strict=True, weights_only=True)
            except Exception as error:
                msg = (
                    f"checkpoint {os.fspath(checkpoint)!r} does not load into CLIP model {label!r}: "
                    f"{error}. The file must hold a state dict for this exact config "
                    "(.safetensors, or a torch file loadable with weights_only=True)."
                )
                raise ModelError(msg) from error
        preprocess_cfg = merge_preprocess_dict(PreprocessCfg(), preprocess_overlay)
        visual_size = getattr(getattr(model, "visual", None), "image_size", None)
        if visual_size is not None:
            preprocess_cfg["size"] = visual_size
        open_clip.set_model_preprocess_cfg(model, preprocess_cfg)
        tokenizer = _tokenizer_for_config(model_cfg, label)
        return cls(model, tokenizer, model_config=model_cfg, name=label, device=device, dtype=dtype)

    @classmethod
    def _from_registry(
        cls,
        model_name: str,
        pretrained: str | os.PathLike[str] | None,
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        cache_dir: str | os.PathLike[str] | None,
    ) -> ClipGuide:
        import open_clip

        arch = model_name.replace("/", "-")  # open_clip's own spelling rule
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            close = difflib.get_close_matches(arch, open_clip.list_models(), n=5, cutoff=0.6)
            hint = f" Did you mean one of {close}?" if close else ""
            msg = (
                f"unknown CLIP model {model_name!r}: open_clip has no config by that name.{hint} "
                "See freevllm_tools.guide.available_models(), or pass a model config "
                "(ClipGuide.from_config) or a local directory in open_clip's layout."
            )
            raise ModelError(msg)

        identity: str | None = None
        force_quick_gelu = False
        if pretrained is None:
            source = None
        else:
            tag_cfg = open_clip.get_pretrained_cfg(arch, os.fspath(pretrained))
            if tag_cfg:
                tag = os.fspath(pretrained).lower().replace("-", "_")
                identity = f"{arch}:{tag}"
                source = os.fspath(pretrained)
                force_quick_gelu = bool(tag_cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu")
            elif os.path.isfile(pretrained):
                source = os.fspath(pretrained)
            else:
                tags = open_clip.list_pretrained_tags_by_model(arch)
                msg = (
                    f"pretrained={os.fspath(pretrained)!r} for CLIP model {arch!r} is neither a known "
                    f"weights tag (known: {tags}) nor an existing checkpoint file; pass one of the "
                    "tags, or the path of a local checkpoint."
                )
                raise ModelError(msg)
        if force_quick_gelu:
            model_cfg["quick_gelu"] = True

        try:
            model = open_clip.create_model(
                arch,
                pretrained=source,
                device="cpu",
                precision="fp32",
                force_quick_gelu=force_quick_gelu,
                pretrained_text=False,
                cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            )
        except Exception as error:
            raise ModelError(_load_failure(arch, source, identity is not None, error)) from error
        tokenizer = open_clip.get_tokenizer(arch)
        return cls(
            model,
            tokenizer,
            model_config=model_cfg,
            identity=identity,
            name=arch,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def _from_schema(
        cls,
        model_name: str,
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        cache_dir: str | os.PathLike[str] | None,
    ) -> ClipGuide:
        """``hf-hub:org/repo`` or ``local-dir:/path``: config and weights from one place."""
        import open_clip

        label = model_name
        try:
            if model_name.startswith(_LOCAL_DIR_PREFIX):
                with open(Path(model_name[len(_LOCAL_DIR_PREFIX):]) / CONFIG_NAME, encoding="utf-8") as f:
                    stored = json.load(f)
                label = stored.get("name") or _DEFAULT_LABEL
            model_cfg = open_clip.get_model_config(model_name)
            model = open_clip.create_model(
                model_name,
                device="cpu",
                precision="fp32",
                pretrained_text=False,
                cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            )
            tokenizer = open_clip.get_tokenizer(
                model_name, cache_dir=os.fspath(cache_dir) if cache_dir is not None else None
            )
        except Exception as error:
            if model_name.startswith(_HF_HUB_PREFIX):
                raise ModelError(_load_failure(model_name, None, True, error)) from error
            msg = (
                f"could not load CLIP model from directory {model_name[len(_LOCAL_DIR_PREFIX):]!r}: "
                f"{error}. It needs {CONFIG_NAME} ({{'model_cfg': ..., 'preprocess_cfg': ...}}) "
                f"and the weights ({WEIGHTS_NAME}), as ClipGuide.save_pretrained writes them."
            )
            raise ModelError(msg) from error
        return cls(
            model, tokenizer, model_config=model_cfg or {}, name=label, device=device, dtype=dtype
        )

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` into ``directory``.

        The result loads with ``ClipGuide.from_pretrained(directory)`` (and with open_clip's own
        ``create_model("local-dir:" + directory)``), offline, with the same ``identity``.
        """
        from safetensors.torch import save_file

        if not self.model_config:
            msg = f"CLIP model {self.name!r} has no model config to save; build it from one."
            raise ModelError(msg)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        preprocess = {k: _jsonable(v) for k, v in self.preprocess_cfg.items()}
        config = {"name": self.name, "model_cfg": self.model_config, "preprocess_cfg": preprocess}
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, os.fspath(path / WEIGHTS_NAME))
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=_jsonable), "utf-8")
        return path

    # ------------------------------------------------------------------ encoding

    def encode_text(self, texts: Sequence[str] | str, *, batch_size: int = 256) -> torch.Tensor:
        """Embed texts with the model's own tokenizer (truncated to its context length).

        Returns:
            ``(B, D)`` float32 on the CPU, L2-normalised; a single string gives ``(1, D)``.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            msg = f"encode_text expects strings, got {bad[0]}; pass a list of str."
            raise InputError(msg)
        _check_batch_size(batch_size)
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
                features = self.model.encode_text(tokens)
                outputs.append(F.normalize(features.float(), dim=-1).cpu())
        if not outputs:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(outputs)

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Frames ``(T, H, W, 3)`` uint8 RGB -> pixels ``(T, 3, *image_size)`` on device and dtype.

        Resized to the model's image size without cropping (aspect ratio not kept), with the
        model's interpolation, then normalised with the model's mean and std.
        """
        images = _as_frames(frames).to(self.device)
        x = images.permute(0, 3, 1, 2).float()
        if tuple(x.shape[-2:]) != self.image_size:
            antialias = self.interpolation != "nearest"
            x = F.interpolate(x, size=self.image_size, mode=self.interpolation, antialias=antialias)
        x = x.clamp_(0.0, 255.0).div_(255.0)
        x = (x - self._mean) / self._std
        return x.to(self.dtype)

    def encode_frames(
        self,
        frames: np.ndarray | torch.Tensor,
        *,
        batch_size: int = 16,
        progress: bool = False,
    ) -> GuideFeatures:
        """Embed frames: pooled image embeddings and dense patch embeddings.

        Args:
            frames: ``(T, H, W, 3)`` uint8 RGB (numpy array or torch tensor).
            batch_size: frames per forward pass.
            progress: show a tqdm progress bar.

        Returns:
            GuideFeatures with ``pooled (T, D)`` and ``dense (T, h, w, D)``, float32 CPU,
            L2-normalised along D.
        """
        images = _as_frames(frames)
        _check_batch_size(batch_size)
        num_frames = int(images.shape[0])
        h, w = self.grid_size
        pooled_parts: list[torch.Tensor] = []
        dense_parts: list[torch.Tensor] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_frames, unit="frame", desc="guide")
        try:
            with torch.inference_mode():
                for start in range(0, num_frames, batch_size):
                    pixels = self.preprocess(images[start : start + batch_size])
                    pooled, tokens = self._forward(pixels)
                    pooled_parts.append(F.normalize(pooled.float(), dim=-1).cpu())
                    dense = F.normalize(tokens.float(), dim=-1).cpu()
                    dense_parts.append(dense.reshape(dense.shape[0], h, w, self.embed_dim))
                    if bar is not None:
                        bar.update(int(pixels.shape[0]))
        finally:
            if bar is not None:
                bar.close()
        if not pooled_parts:
            return GuideFeatures(torch.zeros(0, self.embed_dim), torch.zeros(0, h, w, self.embed_dim))
        return GuideFeatures(torch.cat(pooled_parts), torch.cat(dense_parts))

    def _forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels ``(B, 3, H, W)`` -> pooled ``(B, D)`` and projected patch tokens ``(B, h*w, D)``."""
        visual = self.model.visual
        out = visual.forward_intermediates(
            pixels, indices=1, normalize_intermediates=True, output_fmt="NLC"
        )
        patch_tokens = out["image_intermediates"][-1]  # after ln_post, CLS dropped
        return out["image_features"], patch_tokens @ visual.proj

    def __repr__(self) -> str:
        return (
            f"ClipGuide(identity={self.identity!r}, image_size={self.image_size}, "
            f"grid_size={self.grid_size}, embed_dim={self.embed_dim}, device={str(self.device)!r}, "
            f"dtype={self.dtype})"
        )


# ---------------------------------------------------------------------- helpers


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        msg = f"device {device!r} is not a torch device: {error}; use e.g. 'cpu' or 'cuda:0'."
        raise InputError(msg) from error


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        msg = f"dtype {dtype!r} is not supported for the guide; use float32, float16 or bfloat16."
        raise InputError(msg)
    return resolved


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be a positive integer, got {batch_size!r}."
        raise InputError(msg)


def _as_frames(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate ``(T, H, W, 3)`` uint8 RGB frames and return them as a CPU/any-device tensor."""
    if isinstance(frames, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(frames)) if frames.dtype == np.uint8 else None
        dtype_name, shape = str(frames.dtype), tuple(frames.shape)
    elif isinstance(frames, torch.Tensor):
        tensor = frames if frames.dtype == torch.uint8 else None
        dtype_name, shape = str(frames.dtype), tuple(frames.shape)
    else:
        msg = f"frames must be a numpy array or torch tensor (T, H, W, 3) uint8, got {type(frames).__name__}."
        raise InputError(msg)
    if tensor is None:
        msg = f"frames must be uint8 RGB (T, H, W, 3), got dtype {dtype_name}; convert 0-255 images to uint8."
        raise InputError(msg)
    if len(shape) != 4 or shape[-1] != 3 or min(shape[1:3], default=0) < 1:
        msg = f"frames must have shape (T, H, W, 3) (channels last, RGB), got {shape}."
        raise InputError(msg)
    return tensor


def _openai_stat(name: str) -> tuple[float, float, float]:
    import open_clip

    return tuple(getattr(open_clip, name))  # type: ignore[return-value]


def _config_checkpoint(pretrained: str | os.PathLike[str] | None) -> str | os.PathLike[str] | None:
    """For a model config, ``pretrained`` must be a checkpoint file or None (random weights)."""
    if pretrained is None or os.path.isfile(pretrained):
        return pretrained
    text = os.fspath(pretrained)
    if os.sep in text or "." in Path(text).name:
        msg = (
            f"checkpoint {text!r} does not exist; pass the path of a saved state dict, "
            "or pretrained=None for random weights."
        )
    else:
        msg = (
            f"pretrained={text!r} is not a file; a custom model config has no weights tags. Pass a "
            "checkpoint path (pretrained='/path/open_clip_model.safetensors') or pretrained=None "
            "for random weights."
        )
    raise ModelError(msg)


def _read_config(
    config: Mapping[str, Any] | str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """-> (model_cfg, preprocess overlay, stored name) from a dict or a JSON file."""
    if isinstance(config, Mapping):
        data: Any = copy.deepcopy(dict(config))
    else:
        path = Path(config)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            msg = f"CLIP model config {os.fspath(path)!r} cannot be read as JSON: {error}"
            raise ModelError(msg) from error
    if not isinstance(data, dict):
        msg = f"CLIP model config must be a JSON object, got {type(data).__name__}."
        raise ModelError(msg)
    name = data.get("name") if isinstance(data.get("name"), str) else None
    if "model_cfg" in data:
        model_cfg, preprocess = dict(data["model_cfg"]), dict(data.get("preprocess_cfg") or {})
    else:
        model_cfg, preprocess = data, {}
        model_cfg.pop("name", None)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        msg = (
            f"CLIP model config lacks {missing}; expected an open_clip model config "
            "({'embed_dim': ..., 'vision_cfg': {...}, 'text_cfg': {...}})."
        )
        raise ModelError(msg)
    return model_cfg, preprocess, name


def _tokenizer_for_config(model_cfg: Mapping[str, Any], label: str) -> Any:
    """The tokenizer a config asks for: a Hugging Face one if named, else CLIP's BPE (offline)."""
    import open_clip
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    context_length = int(text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH))
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if text_cfg.get("hf_tokenizer_name"):
        try:
            return HFTokenizer(
                text_cfg["hf_tokenizer_name"],
                context_length=context_length,
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **kwargs,
            )
        except Exception as error:
            msg = (
                f"tokenizer {text_cfg['hf_tokenizer_name']!r} of CLIP model {label!r} cannot be "
                f"loaded: {error}. Download it once with network, or use a config without "
                "hf_tokenizer_name (CLIP's own BPE tokenizer ships with open_clip)."
            )
            raise ModelError(msg) from error
    return open_clip.SimpleTokenizer(context_length=context_length, **kwargs)


def _check_vocab(model: torch.nn.Module, tokenizer: Any, name: str) -> None:
    model_vocab = getattr(model, "vocab_size", None)
    tokenizer_vocab = getattr(tokenizer, "vocab_size", None)
    if isinstance(model_vocab, int) and isinstance(tokenizer_vocab, int) and tokenizer_vocab > model_vocab:
        msg = (
            f"CLIP model {name!r} has a text vocabulary of {model_vocab} ids but its tokenizer "
            f"emits up to {tokenizer_vocab}; set text_cfg.vocab_size >= {tokenizer_vocab}."
        )
        raise ModelError(msg)


def _load_failure(model: str, source: str | None, remote: bool, error: Exception) -> str:
    """A load error message that says what failed and how to get the weights."""
    import open_clip

    if not remote:
        return (
            f"could not load CLIP model {model!r} from checkpoint {source!r}: {error}. The file "
            "must hold an open_clip state dict for that architecture (.safetensors, or a torch "
            "file loadable with weights_only=True)."
        )
    try:
        from huggingface_hub import constants

        offline = bool(constants.is_offline_mode())
    except Exception:  # pragma: no cover - huggingface_hub is an open_clip dependency
        offline = False
    where = f"{model!r} with weights {source!r}" if source else repr(model)
    state = "offline mode is on (HF_HUB_OFFLINE=1), so" if offline else "without network"
    quick = f"{model}-quickgelu"
    arch = quick if source and quick in open_clip.list_models() else model
    return (
        f"could not load CLIP model {where}: {error}. The weights come from the Hugging Face "
        f"Hub; {state} only a copy already in the cache can be used. Download it once with "
        f"network, or pass a local checkpoint path: "
        f"ClipGuide.from_pretrained({arch!r}, pretrained='/path/to/open_clip_model.safetensors')."
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (list,)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def _digest(model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any], model: torch.nn.Module) -> str:
    """A short sha256 over the config, the preprocessing that changes pixels, and the weights.

    The same weights give the same digest whatever file format or directory they came from.
    """
    hasher = hashlib.sha256()
    pixels = {k: preprocess_cfg.get(k) for k in ("size", "mean", "std", "interpolation")}
    header = {"model_cfg": model_cfg, "preprocess": pixels}
    hasher.update(json.dumps(header, sort_keys=True, default=_jsonable).encode())
    for key, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        hasher.update(f"{key}|{value.dtype}|{tuple(value.shape)}".encode())
        if value.numel():
            hasher.update(value.reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()[:16]
