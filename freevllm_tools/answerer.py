"""LLaVA-family answerers on transformers: per-frame projected tokens, splice, generate, stream.

The answerer has two jobs, kept apart so that the perception stage can sit between them:

1. :meth:`LlavaAnswerer.encode_frames` turns frames into the tokens the language model sees,
   the way the model itself does it for one image: resize to the vision tower's image size
   (aspect ratio not kept, no any-res tiling), normalise, take the vision tower's hidden state at
   ``config.vision_feature_layer``, drop the CLS token where the tower has one, and run the
   multimodal projector. The result keeps its grid: ``(T, h, w, D)``.
2. :meth:`LlavaAnswerer.answer` takes any planned sequence of those tokens, ``(N, D)``, splices it
   at the prompt's one image placeholder (exactly ``N`` embeddings: no ``image_newline``, no
   tiling) and generates with a key-value cache, timing the pre-fill and the decoding apart.

Families are picked from ``config.model_type`` through :data:`FAMILIES`, never from a name.
Tested against transformers 5.x (the ``cache`` keyword and ``rope_parameters``); the few version
differences that matter are resolved once, in :class:`LlavaAnswerer`'s constructor.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, ModelError

__all__ = [
    "DEFAULT_MODEL",
    "CPU_MODEL",
    "FAMILIES",
    "ModelFamily",
    "Generation",
    "PreparedPrompt",
    "LlavaAnswerer",
    "get_family",
    "list_families",
    "timing_context",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "llava-hf/llava-v1.6-vicuna-7b-hf"
"""The paper's model (GPU default)."""
CPU_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
"""A small LLaVA-family model that answers on a CPU."""

SYSTEM_PROMPT = (
    "You are a helpful assistant that answers questions about videos. "
    "Answer from what the frames show."
)
INSTRUCTION = (
    "These are key frames sampled from one video, shown in time order. "
    "Answer the question about the video.\nQuestion: {question}"
)
ANSWER_PRIMER = "In the video,"


def timing_context(times: Sequence[float], duration: float | None = None) -> str:
    """A sentence that tells the language model when its key frames were taken.

    "The video lasts 5.0 seconds; its key frames are at 1.2, 1.3 and 3.0 seconds." The
    visual tokens themselves carry no time, so without it a question such as "does it happen
    early or late?" cannot be answered from prompt-guided frames (LLaVA-Video states frame
    times in its prompt for the same reason). Empty when there is nothing to tell.
    """
    parts = []
    if duration is not None and duration > 0:
        parts.append(f"The video lasts {duration:.1f} seconds")
    if len(times):
        listed = [f"{t:.1f}" for t in times]
        listed = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} and {listed[-1]}"
        parts.append(f"its key frames are at {listed} seconds" if parts else f"The key frames are at {listed} seconds")
    return "; ".join(parts) + "." if parts else ""


# --------------------------------------------------------------------------------------------
# Families and prompt formats
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """One LLaVA family: the transformers class that loads it and its default prompt format."""

    model_type: str
    """``config.model_type`` of the checkpoints of this family."""
    model_class: str
    """Name of the ``*ForConditionalGeneration`` class in ``transformers``."""
    prompt_format: str
    """Key in :data:`PROMPT_FORMATS` used unless the caller picks another."""


FAMILIES: dict[str, ModelFamily] = {
    "llava_next": ModelFamily("llava_next", "LlavaNextForConditionalGeneration", "vicuna"),
    "llava_onevision": ModelFamily(
        "llava_onevision", "LlavaOnevisionForConditionalGeneration", "chat_template"
    ),
}


def list_families() -> list[str]:
    """The ``model_type`` values this module can answer with."""
    return sorted(FAMILIES)


def get_family(model_type: str) -> ModelFamily:
    """The family registered for ``model_type``; :class:`ModelError` when there is none."""
    family = FAMILIES.get(model_type)
    if family is None:
        msg = (
            f"model_type {model_type!r} is not a supported LLaVA family; supported: "
            f"{', '.join(list_families())} (e.g. {DEFAULT_MODEL!r} or {CPU_MODEL!r})"
        )
        raise ModelError(msg)
    return family


PROMPT_FORMATS = ("vicuna", "chat_template")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One generated answer and what it cost."""

    text: str
    """The answer, starting with the primer ("In the video, ...")."""
    num_prompt_tokens: int
    """Positions in the pre-fill: text tokens + visual tokens (the placeholder replaced)."""
    num_new_tokens: int
    """Tokens the model generated, counting a final end-of-sequence token."""
    prefill_s: float
    """Seconds for the forward pass over the prompt (up to the first new token)."""
    generate_s: float
    """Seconds spent generating the tokens after the first (compute only, not the caller's)."""
    token_ids: list[int] = field(default_factory=list)
    """Generated token ids, without the end-of-sequence token."""
    finish_reason: str = "length"
    """``"stop"`` (end-of-sequence token) or ``"length"`` (``max_new_tokens`` reached)."""

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: tokens after the first per second of ``generate_s``."""
        if self.num_new_tokens <= 1 or self.generate_s <= 0:
            return 0.0
        return (self.num_new_tokens - 1) / self.generate_s


@dataclass
class PreparedPrompt:
    """A prompt with its visual sequence spliced in, ready for the language model."""

    input_ids: torch.Tensor
    """``(L,)`` token ids of the text prompt, with exactly one image placeholder."""
    image_position: int
    """Index of the placeholder in ``input_ids``; the visual tokens start here."""
    inputs_embeds: torch.Tensor
    """``(L - 1 + N, D)`` embeddings: text before, ``N`` visual tokens, text after."""
    num_visual_tokens: int
    """``N``."""

    @property
    def num_tokens(self) -> int:
        """Positions the language model pre-fills."""
        return int(self.inputs_embeds.shape[0])


# --------------------------------------------------------------------------------------------
# Helpers: devices, RoPE, identities, text
# --------------------------------------------------------------------------------------------


def _default_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | str | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 (fp16 where bf16 is unsupported) when present, else CPU in float32."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            msg = f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16', 'float32'"
            raise InputError(msg)
        dtype = resolved
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    return device, dtype


def _rope_dict(text_config: Any) -> dict[str, Any] | None:
    """The RoPE settings of a text config: ``rope_parameters`` (v5) or ``rope_scaling`` (v4)."""
    params = getattr(text_config, "rope_parameters", None)
    if params is None:
        params = getattr(text_config, "rope_scaling", None)
    return params if isinstance(params, dict) else None


def set_rope_scaling(text_config: Any, factor: float | None) -> bool:
    """Switch ``text_config`` to dynamic-NTK RoPE scaling with ``factor`` (in place).

    transformers 5 keeps RoPE in ``text_config.rope_parameters`` (``rope_type``, ``rope_theta``,
    ``factor``); 4.x used ``rope_scaling``. ``None`` leaves the config alone. A model whose RoPE is
    already scaled another way (yarn, llama3, ...) keeps it, with a warning. Returns whether the
    config now uses dynamic scaling.
    """
    if factor is None:
        return False
    factor = float(factor)
    if factor < 1.0:
        msg = f"rope_scaling_factor must be >= 1 (or None to keep the model's RoPE), got {factor}"
        raise InputError(msg)
    if hasattr(text_config, "rope_parameters"):
        params = dict(text_config.rope_parameters or {})
        if any(isinstance(value, dict) for value in params.values()):
            logger.warning("per-layer RoPE parameters: dynamic scaling not applied")
            return False
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "dynamic"):
            logger.warning("model uses %s RoPE scaling; dynamic factor %s not applied", rope_type, factor)
            return False
        theta = params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
        new = {"rope_type": "dynamic", "factor": factor, "rope_theta": theta}
        if "partial_rotary_factor" in params:
            new["partial_rotary_factor"] = params["partial_rotary_factor"]
        text_config.rope_parameters = new
        validate = getattr(text_config, "validate_rope", None)
        if callable(validate):
            validate()
        return True
    scaling = getattr(text_config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "dynamic"):
        logger.warning("model uses %s RoPE scaling; dynamic factor %s not applied", rope_type, factor)
        return False
    text_config.rope_scaling = {"type": "dynamic", "rope_type": "dynamic", "factor": factor}
    return True


def _context_limit(text_config: Any) -> tuple[int, int, float]:
    """``(limit, max_position_embeddings, factor)``: the longest sequence the model may see."""
    max_positions = int(getattr(text_config, "max_position_embeddings", 0) or 0)
    params = _rope_dict(text_config) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    factor = float(params.get("factor") or 1.0) if rope_type in ("dynamic", "linear") else 1.0
    return int(max_positions * factor), max_positions, factor


def _model_digest(model: torch.nn.Module) -> str:
    """A cheap, stable digest of a model's weights: names, shapes, a sample and a sum of each."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if tensor.device.type == "meta":
                continue
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            flat = tensor.detach().reshape(-1)
            digest.update(flat[:16].to("cpu", torch.float64).numpy().tobytes())
            digest.update(np.float64(flat.to(torch.float64).sum().item()).tobytes())
    return digest.hexdigest()[:16]


def _directory_digest(directory: Path) -> str:
    """A digest of a model directory: each file's name, size, head and tail (fast for 14 GB)."""
    digest = hashlib.sha256()
    chunk = 1 << 16
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(directory)}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(chunk))
            if size > 2 * chunk:
                handle.seek(size - chunk)
                digest.update(handle.read(chunk))
    return digest.hexdigest()[:16]


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a directory rather than a hub id (``org/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
    )


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class _IncrementalText:
    """Decode generated ids in the context of the prompt's tail, so that word pieces, spaces
    and multi-byte characters come out as they will in the final text.

    ``text(ids)`` is the answer so far; a prefix of it is safe to stream unless it ends in an
    incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int], primer: str) -> None:
        self.tokenizer = tokenizer
        self.context = list(context_ids)
        self.primer = primer
        self.prefix = self._decode(self.context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def text(self, ids: Sequence[int]) -> str:
        full = self._decode(self.context + list(ids))
        if full.startswith(self.prefix):
            generated = full[len(self.prefix) :]
        else:  # a tokenizer whose decoding is not prefix-stable: decode the answer alone
            generated = " " + self._decode(ids)
        return (self.primer + generated).strip()


# --------------------------------------------------------------------------------------------
# The answerer
# --------------------------------------------------------------------------------------------


class LlavaAnswerer:
    """Answers questions over a planned visual sequence with a LLaVA-family model.

    Build it with :meth:`from_pretrained` (hub name or local directory) or :meth:`from_model`
    (parts built in memory, e.g. by :mod:`freevllm_tools.testing`).

    Each call owns its key-value cache, so calls from several threads do not mix answers; the
    one shared state is transformers' dynamic RoPE, which rescales by the longest sequence in
    flight past the original context (serialise calls there for bit-exact reproducibility).
    ``stream`` holds no lock, so it may be consumed from any thread.
    """

    identity: str
    grid_size: tuple[int, int]
    hidden_size: int
    image_size: tuple[int, int]

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        image_size: int | Sequence[int] | None = None,
        identity: str | None = None,
        processor: Any = None,
        chat_template: str | None = None,
        prompt_format: str | None = None,
        system_prompt: str = SYSTEM_PROMPT,
        instruction: str = INSTRUCTION,
        primer: str = ANSWER_PRIMER,
        max_context: int | None = None,
    ) -> None:
        config = model.config
        self.family = get_family(getattr(config, "model_type", ""))
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        inner = getattr(model, "model", model)
        self._vision_tower = inner.vision_tower
        self._projector = inner.multi_modal_projector
        self.language_model = inner.language_model
        self.text_config = config.text_config
        vision_config = config.vision_config

        size = image_size if image_size is not None else vision_config.image_size
        if isinstance(size, int):
            self.image_size = (int(size), int(size))
        else:
            self.image_size = tuple(int(side) for side in size)
        patch = int(vision_config.patch_size)
        self.grid_size = (self.image_size[0] // patch, self.image_size[1] // patch)
        self.hidden_size = int(self.text_config.hidden_size)
        self.image_mean = torch.tensor([float(v) for v in image_mean]).view(1, 3, 1, 1)
        self.image_std = torch.tensor([float(v) for v in image_std]).view(1, 3, 1, 1)
        layer = config.vision_feature_layer
        self.vision_feature_layer: int | list[int] = layer if isinstance(layer, int) else list(layer)
        self.vision_feature_select_strategy = config.vision_feature_select_strategy
        self.identity = identity or f"{self.family.model_type}-random@{_model_digest(model)}"

        # Prompt
        self.prompt_format = prompt_format or self.family.prompt_format
        if self.prompt_format not in PROMPT_FORMATS:
            msg = f"prompt_format {self.prompt_format!r} is not one of {PROMPT_FORMATS}"
            raise InputError(msg)
        self.chat_template = chat_template or getattr(processor, "chat_template", None)
        self.system_prompt, self.instruction, self.primer = system_prompt, instruction, primer
        self.image_token_id = int(config.image_token_id)
        try:
            self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        except (IndexError, KeyError, OverflowError):
            self.image_token = None
        if (
            not isinstance(self.image_token, str)
            or tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id
        ):
            msg = (
                f"the tokenizer of {self.identity} has no token for the image placeholder id "
                f"{self.image_token_id} (config.image_token_id); tokenizer and model do not match"
            )
            raise ModelError(msg)
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
        specials |= {str(t) for t in added if getattr(t, "special", False)} | {self.image_token}
        # Removed from questions: a question cannot add a placeholder or end a chat turn.
        self._special_strings = sorted(specials, key=len, reverse=True)
        self._adds_bos = self._tokenizer_adds_bos()

        # Generation
        generation_config = getattr(model, "generation_config", None)
        eos = set(_as_id_list(getattr(tokenizer, "eos_token_id", None)))
        eos |= set(_as_id_list(getattr(generation_config, "eos_token_id", None)))
        eos |= set(_as_id_list(getattr(self.text_config, "eos_token_id", None)))
        self.eos_token_ids: set[int] = eos
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (min(eos) if eos else 0))
        limit, self.max_position_embeddings, self.rope_scaling_factor = _context_limit(self.text_config)
        self.max_context = int(max_context) if max_context is not None else limit
        forward_parameters = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_parameters else "past_key_values"
        self._logits_kwarg = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in forward_parameters), None
        )

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        image_size: int | Sequence[int] | None = None,
        identity: str | None = None,
        rope_scaling_factor: float | None = 2.0,
        **kwargs: Any,
    ) -> LlavaAnswerer:
        """Wrap a model built in memory. Applies dynamic RoPE scaling to it (in place).

        ``identity`` defaults to a digest of the weights. ``kwargs`` go to the constructor
        (``processor``, ``chat_template``, ``prompt_format``, ``primer``, ``max_context``, ...).
        """
        if set_rope_scaling(model.config.text_config, rope_scaling_factor):
            _rebuild_rotary_embedding(model)
        return cls(
            model,
            tokenizer,
            image_mean=image_mean,
            image_std=image_std,
            image_size=image_size,
            identity=identity,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        rope_scaling_factor: float | None = 2.0,
        local_files_only: bool | None = None,
        **kwargs: Any,
    ) -> LlavaAnswerer:
        """Load a LLaVA-family model and its processor from the HF cache or a local directory.

        On CUDA the model loads in bf16 (fp16 where bf16 is unsupported), else on the CPU in
        float32. ``device_map`` is passed to transformers as is. ``local_files_only`` defaults
        to on for a directory or when ``HF_HUB_OFFLINE`` is set. A model that cannot be loaded
        raises :class:`ModelError` saying which one and how to get it.
        """
        import transformers

        name = os.fspath(name_or_path)
        path = Path(os.path.expanduser(name))
        is_dir = path.is_dir()
        if not is_dir and (path.exists() or _looks_like_path(name)):
            what = "is a file, not a model directory" if path.exists() else "does not exist"
            msg = (
                f"cannot load model {name!r}: {path} {what}; pass a directory holding config.json "
                f"and the weights (e.g. one made by save_pretrained), or a hub name such as "
                f"{DEFAULT_MODEL!r}"
            )
            raise ModelError(msg)
        source = str(path) if is_dir else name
        if local_files_only is None:
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
            local_files_only = is_dir or offline in {"1", "true", "yes", "on"}
        hint = (
            f"check the directory {source}"
            if is_dir
            else f"download it once with network access (`hf download {name}`) "
            f"or pass a local directory"
        )

        files = {"local_files_only": local_files_only}
        try:
            config = transformers.AutoConfig.from_pretrained(source, **files)
        except (OSError, ValueError, KeyError) as error:
            msg = f"cannot load the config of model {name!r}: {error}; {hint}"
            raise ModelError(msg) from error
        try:
            family = get_family(getattr(config, "model_type", ""))
        except ModelError as error:
            msg = f"cannot answer with model {name!r}: {error}"
            raise ModelError(msg) from error

        # The small parts first, so that a missing tokenizer fails before gigabytes of weights load.
        processor, tokenizer, image_processor = None, None, None
        try:
            processor = transformers.AutoProcessor.from_pretrained(source, **files)
            tokenizer = getattr(processor, "tokenizer", None)
            image_processor = getattr(processor, "image_processor", None)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.info("no processor for %s (%s); loading tokenizer and image processor", name, error)
            processor = None
        try:
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, **files)
            if image_processor is None:
                image_processor = transformers.AutoImageProcessor.from_pretrained(source, **files)
        except (OSError, ValueError, KeyError) as error:
            msg = f"cannot load the tokenizer or image processor of model {name!r}: {error}; {hint}"
            raise ModelError(msg) from error

        set_rope_scaling(config.text_config, rope_scaling_factor)
        device, dtype = _default_device_dtype(device, dtype)
        model_class = getattr(transformers, family.model_class)
        load_kwargs: dict[str, Any] = {"config": config, "dtype": dtype, **files}
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        try:
            model = model_class.from_pretrained(source, **load_kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as error:
            msg = f"cannot load the weights of model {name!r}: {error}; {hint}"
            raise ModelError(msg) from error
        if device_map is None:
            model = model.to(device)

        if is_dir:
            identity = f"{path.resolve().name}@{_directory_digest(path.resolve())}"
        else:
            commit = getattr(config, "_commit_hash", None)
            identity = f"{name}@{commit}" if commit else name
        return cls(
            model,
            tokenizer,
            image_mean=image_processor.image_mean,
            image_std=image_processor.image_std,
            identity=identity,
            processor=processor,
            **kwargs,
        )

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write model, tokenizer and processor so that :meth:`from_pretrained` loads them back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        if self.processor is not None:
            self.processor.save_pretrained(directory)
        else:
            from transformers import CLIPImageProcessor

            self.tokenizer.save_pretrained(directory)
            height, width = self.image_size
            CLIPImageProcessor(
                image_mean=self.image_mean.flatten().tolist(),
                image_std=self.image_std.flatten().tolist(),
                size={"height": height, "width": width},
                crop_size={"height": height, "width": width},
                do_center_crop=False,
            ).save_pretrained(directory)
        return directory

    # ---------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        """Where the input embeddings live (inputs go here)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The language model's floating-point type."""
        return self.model.get_input_embeddings().weight.dtype

    def __repr__(self) -> str:
        return (
            f"LlavaAnswerer(identity={self.identity!r}, family={self.family.model_type!r}, "
            f"grid={self.grid_size}, hidden_size={self.hidden_size}, max_context={self.max_context})"
        )

    # ---------------------------------------------------------------- frames -> tokens

    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Frames ``(T, H, W, 3)`` uint8 RGB -> pixel values ``(T, 3, h, w)`` for the vision tower.

        Resized to the tower's image size without keeping the aspect ratio (bicubic, rounded to
        whole pixel values as an image processor's uint8 output is), scaled to [0, 1] and
        normalised with the model's mean and std. On the tower's device and dtype.
        """
        tensor = torch.as_tensor(frames)
        if tensor.ndim != 4 or tensor.shape[-1] != 3 or tensor.dtype != torch.uint8:
            msg = (
                f"frames must be a (T, H, W, 3) uint8 RGB array, got shape {tuple(tensor.shape)} "
                f"and dtype {tensor.dtype}"
            )
            raise InputError(msg)
        parameter = next(self._vision_tower.parameters())
        pixels = tensor.to(parameter.device).permute(0, 3, 1, 2).float()
        if tuple(pixels.shape[-2:]) != self.image_size and pixels.shape[0] > 0:
            pixels = F.interpolate(
                pixels, size=self.image_size, mode="bicubic", align_corners=False, antialias=True
            )
            pixels = pixels.round().clamp(0, 255)
        mean = self.image_mean.to(pixels.device)
        std = self.image_std.to(pixels.device)
        return ((pixels / 255.0 - mean) / std).to(parameter.dtype)

    def _project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values ``(B, 3, h, w)`` -> projected grid tokens ``(B, gh, gw, D)``."""
        layers = self.vision_feature_layer
        # Ask for the selected hidden states only (transformers 5); a bare 0 would read as False.
        wanted = True if layers == 0 else layers
        outputs = self._vision_tower(pixel_values, output_hidden_states=wanted, return_dict=True)
        if isinstance(layers, int):
            features = outputs.hidden_states[layers]
        else:
            features = torch.cat([outputs.hidden_states[i] for i in layers], dim=-1)
        rows, columns = self.grid_size
        num_patches = rows * columns
        if features.shape[1] == num_patches + 1:
            # A CLS token leads (CLIP). "default" drops it, as the model does; "full" would keep it,
            # but a grid has no place for it, so the grid tokens are the same either way.
            features = features[:, 1:]
        elif features.shape[1] != num_patches:
            msg = (
                f"vision tower of {self.identity} gave {features.shape[1]} tokens a frame; expected "
                f"{num_patches} patches ({rows}x{columns}), with or without one CLS token"
            )
            raise ModelError(msg)
        # No CLS (SigLIP): keep every patch whatever the strategy says, never drop one.
        tokens = self._projector(features)
        return tokens.reshape(tokens.shape[0], rows, columns, tokens.shape[-1])

    def encode_frames(
        self, frames: np.ndarray | torch.Tensor, *, batch_size: int = 8, progress: bool = False
    ) -> torch.Tensor:
        """Each frame's LLM-side tokens: ``(T, H, W, 3)`` uint8 -> ``(T, h, w, D)``.

        ``h, w`` is :attr:`grid_size` (24x24 for CLIP-L/336, 27x27 for SigLIP-384/14) and ``D``
        is :attr:`hidden_size`. On the model's device and dtype.
        """
        if batch_size < 1:
            msg = f"batch_size must be >= 1, got {batch_size}"
            raise InputError(msg)
        num_frames = len(frames)
        starts = range(0, num_frames, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="LLaVA frames", unit="batch")
        chunks = []
        with torch.inference_mode():
            for start in starts:
                pixel_values = self.preprocess(frames[start : start + batch_size])
                chunks.append(self._project(pixel_values))
        if not chunks:
            self.preprocess(frames)  # validates the (empty) input
            return torch.empty((0, *self.grid_size, self.hidden_size), device=self.device, dtype=self.dtype)
        return torch.cat(chunks).to(self.device)

    # ---------------------------------------------------------------- prompt

    def _tokenizer_adds_bos(self) -> bool:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            return False
        ids = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return bool(ids) and ids[0] == bos

    def _clean_question(self, question: str) -> str:
        if not isinstance(question, str):
            msg = f"question must be a string, got {type(question).__name__}"
            raise InputError(msg)
        question = " ".join(self._strip_specials(question).split())
        if not question:
            msg = "question is empty (after removing special tokens); ask something about the video"
            raise InputError(msg)
        return question

    def _strip_specials(self, text: str) -> str:
        for special in self._special_strings:
            text = text.replace(special, " ")
        return text

    def build_prompt(self, question: str, context: str | None = None) -> str:
        """The prompt text, with one image placeholder, ending in the answer primer.

        ``context`` (a :func:`timing_context` sentence, say) goes before the instruction.
        """
        instruction = self.instruction.format(question=self._clean_question(question))
        context = " ".join(self._strip_specials(context or "").split())
        if context:
            instruction = f"{context} {instruction}"
        if self.prompt_format == "vicuna":
            user = f"USER: {self.image_token}\n{instruction}"
            return f"{self.system_prompt} {user} ASSISTANT: {self.primer}".rstrip()
        rendered = self._render_chat_template(instruction)
        if self.primer:
            rendered += ("" if rendered[-1:].isspace() else " ") + self.primer
        return rendered

    def _render_chat_template(self, instruction: str) -> str:
        """Render with the processor's template (list content) or the tokenizer's (strings)."""
        candidates = []
        if self.chat_template:
            candidates.append((self.chat_template, "list"))
        if getattr(self.tokenizer, "chat_template", None):
            candidates.append((self.tokenizer.chat_template, "string"))
        if not candidates:
            msg = (
                f"{self.identity} has no chat template (processor or tokenizer); "
                f"pass prompt_format='vicuna' or a chat_template"
            )
            raise ModelError(msg)
        errors = []
        for template, style in candidates:
            for with_system in (True, False):
                messages = self._messages(instruction, style, with_system)
                try:
                    rendered = self.tokenizer.apply_chat_template(
                        messages, chat_template=template, add_generation_prompt=True, tokenize=False
                    )
                except Exception as error:  # noqa: BLE001 - templates raise anything (jinja)
                    errors.append(f"{style}/system={with_system}: {error}")
                    continue
                if isinstance(rendered, list):
                    rendered = rendered[0]
                if rendered.count(self.image_token) == 1:
                    return rendered
                count = rendered.count(self.image_token)
                errors.append(f"{style}/system={with_system}: {count} placeholders")
        msg = f"the chat template of {self.identity} gave no prompt with one image placeholder: {errors}"
        raise ModelError(msg)

    def _messages(self, instruction: str, style: str, with_system: bool) -> list[dict[str, Any]]:
        text = instruction if with_system else f"{self.system_prompt}\n{instruction}"
        if style == "list":
            user: Any = [{"type": "image"}, {"type": "text", "text": text}]
            system: Any = [{"type": "text", "text": self.system_prompt}]
        else:
            user = f"{self.image_token}\n{text}"
            system = self.system_prompt
        messages = [{"role": "user", "content": user}]
        if with_system:
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def tokenize_prompt(self, question: str, context: str | None = None) -> torch.Tensor:
        """Token ids ``(L,)`` of :meth:`build_prompt` (with BOS where the tokenizer uses one)."""
        prompt = self.build_prompt(question, context)
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if self._adds_bos and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return torch.tensor(ids, dtype=torch.long)

    def prepare(
        self,
        question: str,
        visual_tokens: torch.Tensor,
        *,
        context: str | None = None,
        max_new_tokens: int = 128,
    ) -> PreparedPrompt:
        """Splice ``visual_tokens`` ``(N, D)`` at the prompt's one image placeholder
        (``context``: see :meth:`build_prompt`).

        Checks, before any model call, that there is exactly one placeholder, that the tokens
        have the model's width, and that prompt + ``max_new_tokens`` fits the context
        (``max_position_embeddings`` x RoPE factor). Raises :class:`ModelError` with the numbers.
        """
        if not isinstance(visual_tokens, torch.Tensor) or visual_tokens.ndim != 2:
            got = visual_tokens.shape if isinstance(visual_tokens, torch.Tensor) else type(visual_tokens)
            msg = f"visual_tokens must be a (N, D) tensor, got {got}"
            raise InputError(msg)
        num_visual, width = visual_tokens.shape
        if width != self.hidden_size:
            msg = (
                f"visual_tokens have width {width}, but {self.identity} expects {self.hidden_size}; "
                f"encode the frames with this answerer's encode_frames"
            )
            raise ModelError(msg)
        if num_visual < 1:
            msg = "visual_tokens is empty: the plan kept no visual tokens"
            raise InputError(msg)
        if max_new_tokens < 1:
            msg = f"max_new_tokens must be >= 1, got {max_new_tokens}"
            raise InputError(msg)
        input_ids = self.tokenize_prompt(question, context)
        positions = (input_ids == self.image_token_id).nonzero().flatten().tolist()
        if len(positions) != 1:
            msg = (
                f"the prompt for {self.identity} has {len(positions)} image placeholders "
                f"(id {self.image_token_id}); exactly 1 is needed to splice the visual tokens"
            )
            raise ModelError(msg)
        position = positions[0]
        num_text = len(input_ids) - 1
        total = num_text + num_visual
        if total + max_new_tokens > self.max_context:
            msg = (
                f"prompt of {total} tokens ({num_visual} visual + {num_text} text) plus up to "
                f"{max_new_tokens} new tokens = {total + max_new_tokens} exceeds the context of "
                f"{self.identity}: {self.max_context} (max_position_embeddings "
                f"{self.max_position_embeddings} x RoPE factor {self.rope_scaling_factor:g}); "
                f"use fewer visual tokens (fewer frames or a smaller preset) or fewer new tokens"
            )
            raise ModelError(msg)
        embedding = self.model.get_input_embeddings()
        with torch.inference_mode():
            text = embedding(input_ids.to(self.device))
            visual = visual_tokens.to(self.device, text.dtype)
            inputs_embeds = torch.cat([text[:position], visual, text[position + 1 :]])
        return PreparedPrompt(input_ids, position, inputs_embeds, int(num_visual))

    # ---------------------------------------------------------------- generation

    def answer(
        self,
        question: str,
        visual_tokens: torch.Tensor,
        *,
        context: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Generation:
        """Answer ``question`` about the visual sequence ``(N, D)``; greedy unless ``temperature > 0``.

        ``context`` is a sentence about the video put before the question (see
        :func:`timing_context`).
        """
        sampling = {"temperature": temperature, "top_p": top_p, "seed": seed}
        batch = self.answer_batch(
            [question], [visual_tokens], contexts=[context], max_new_tokens=max_new_tokens, **sampling
        )
        return batch[0]

    def answer_batch(
        self,
        questions: Sequence[str],
        visual_tokens: Sequence[torch.Tensor],
        *,
        contexts: Sequence[str | None] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Answer several questions in one left-padded batch (each with its own visual sequence).

        Greedy results equal one-by-one answers while every sequence fits the unscaled context
        (dynamic RoPE rescales by the batch's longest sequence). ``prefill_s`` and
        ``generate_s`` are the batch's, shared by its results.
        """
        contexts = [None] * len(questions) if contexts is None else list(contexts)
        if not len(questions) == len(visual_tokens) == len(contexts):
            msg = (
                f"{len(questions)} questions, {len(visual_tokens)} visual sequences and "
                f"{len(contexts)} contexts; give one of each per question"
            )
            raise InputError(msg)
        if not questions:
            return []
        prepared = [
            self.prepare(q, v, context=c, max_new_tokens=max_new_tokens)
            for q, v, c in zip(questions, visual_tokens, contexts)
        ]
        run = _Run(self, prepared, max_new_tokens, temperature, top_p, seed)
        for _ in run.steps():
            pass
        return run.results()

    def stream(
        self,
        question: str,
        visual_tokens: torch.Tensor,
        *,
        context: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_finish: Callable[[Generation], None] | None = None,
    ) -> Iterator[str]:
        """Yield the answer in pieces as it is generated; ``"".join(pieces) == answer(...).text``.

        Pieces never split a character or a word piece mid-way. ``on_finish`` receives the
        :class:`Generation` (timings, counts) once the answer is complete.
        """
        prepared = self.prepare(question, visual_tokens, context=context, max_new_tokens=max_new_tokens)
        run = _Run(self, [prepared], max_new_tokens, temperature, top_p, seed)
        return self._stream_pieces(run, on_finish)

    def _stream_pieces(
        self, run: _Run, on_finish: Callable[[Generation], None] | None
    ) -> Iterator[str]:
        emitted = ""
        for _ in run.steps():
            text = run.decoders[0].text(run.generated[0])
            # Hold back a half character (U+FFFD at the end) and anything not extending what
            # was already sent.
            if text.endswith("\ufffd") or not text.startswith(emitted) or len(text) == len(emitted):
                continue
            yield text[len(emitted) :]
            emitted = text
        result = run.results()[0]
        if result.text.startswith(emitted):
            if len(result.text) > len(emitted):
                yield result.text[len(emitted) :]
        else:  # pragma: no cover - decoding that is not prefix-stable
            logger.warning("streamed text %r is not a prefix of the answer %r", emitted, result.text)
        if on_finish is not None:
            on_finish(result)

    # ---------------------------------------------------------------- internals used by _Run

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56
            return DynamicCache()

    def _reset_dynamic_rope(self) -> None:
        """Forget the frequencies a previous, longer sequence left in a dynamic RoPE module, so
        that an answer does not depend on what was asked before."""
        rotary = getattr(self.language_model, "rotary_emb", None)
        original = getattr(rotary, "original_inv_freq", None)
        if rotary is None or original is None or not hasattr(rotary, "original_max_seq_len"):
            return
        if getattr(rotary, "max_seq_len_cached", None) != rotary.original_max_seq_len:
            rotary.inv_freq = original.clone()
            rotary.max_seq_len_cached = rotary.original_max_seq_len

    def _forward(self, cache: Any, **inputs: Any) -> torch.Tensor:
        """One cached forward; the logits of the last position ``(B, V)``."""
        kwargs = dict(inputs, use_cache=True)
        kwargs[self._cache_kwarg] = cache
        if self._logits_kwarg is not None:
            kwargs[self._logits_kwarg] = 1
        with torch.inference_mode():
            outputs = self.model(**kwargs)
        return outputs.logits[:, -1, :]


def _rebuild_rotary_embedding(model: Any) -> None:
    """Re-create the language model's rotary embedding from its (changed) config."""
    inner = getattr(model, "model", model)
    language_model = inner.language_model
    rotary = getattr(language_model, "rotary_emb", None)
    if rotary is None:
        return
    buffer = getattr(rotary, "inv_freq", None)
    device = buffer.device if isinstance(buffer, torch.Tensor) else None
    if device is not None and device.type == "meta":
        device = None
    new = type(rotary)(config=language_model.config)
    language_model.rotary_emb = new.to(device) if device is not None else new


class _Run:
    """One batched generation: left-padded pre-fill, then one token per step with the cache."""

    def __init__(
        self,
        answerer: LlavaAnswerer,
        prepared: list[PreparedPrompt],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
    ) -> None:
        self.answerer = answerer
        self.prepared = prepared
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            msg = f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}"
            raise InputError(msg)
        self.generator: torch.Generator | None = None
        if self.temperature > 0 and seed is not None:
            self.generator = torch.Generator(device=answerer.device).manual_seed(int(seed))
        size = len(prepared)
        self.generated: list[list[int]] = [[] for _ in range(size)]
        self.num_new = [0] * size
        self.finished = [False] * size
        self.stopped = [False] * size
        self.prefill_s = 0.0
        self.generate_s = 0.0
        self.decoders = []
        for item in prepared:
            after = item.input_ids[item.image_position + 1 :].tolist()
            self.decoders.append(_IncrementalText(answerer.tokenizer, after[-8:], answerer.primer))

    def _synchronize(self) -> None:
        device = self.answerer.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > self.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def _accept(self, tokens: list[int]) -> None:
        eos = self.answerer.eos_token_ids
        for row, token in enumerate(tokens):
            if self.finished[row]:
                continue
            self.num_new[row] += 1
            if token in eos:
                self.finished[row] = self.stopped[row] = True
                continue
            self.generated[row].append(token)
            if self.num_new[row] >= self.max_new_tokens:
                self.finished[row] = True

    def steps(self) -> Iterator[None]:
        """Run the generation, yielding after each new token (of every unfinished row)."""
        answerer = self.answerer
        device = answerer.device
        lengths = [item.num_tokens for item in self.prepared]
        longest = max(lengths)
        width = answerer.hidden_size
        embeds = torch.zeros((len(lengths), longest, width), device=device, dtype=answerer.dtype)
        mask = torch.zeros((len(lengths), longest), device=device, dtype=torch.long)
        for row, item in enumerate(self.prepared):
            embeds[row, longest - lengths[row] :] = item.inputs_embeds
            mask[row, longest - lengths[row] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Without padding the mask says nothing: leave it out, so attention takes its causal path.
        padded = min(lengths) != longest
        answerer._reset_dynamic_rope()
        cache = answerer._new_cache()

        self._synchronize()
        start = time.perf_counter()
        logits = answerer._forward(
            cache, inputs_embeds=embeds, attention_mask=mask if padded else None, position_ids=positions
        )
        tokens = self._pick(logits)
        token_list = tokens.tolist()
        self.prefill_s = time.perf_counter() - start
        self._accept(token_list)
        yield

        position = positions[:, -1:]
        pad = answerer.pad_token_id
        while not all(self.finished):
            start = time.perf_counter()
            feed = torch.tensor(
                [pad if done else token for token, done in zip(token_list, self.finished)], device=device
            ).unsqueeze(-1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            position = position + 1
            logits = answerer._forward(
                cache, input_ids=feed, attention_mask=mask if padded else None, position_ids=position
            )
            token_list = self._pick(logits).tolist()
            self.generate_s += time.perf_counter() - start
            self._accept(token_list)
            yield

    def results(self) -> list[Generation]:
        return [
            Generation(
                text=self.decoders[row].text(self.generated[row]),
                num_prompt_tokens=item.num_tokens,
                num_new_tokens=self.num_new[row],
                prefill_s=self.prefill_s,
                generate_s=self.generate_s,
                token_ids=list(self.generated[row]),
                finish_reason="stop" if self.stopped[row] else "length",
            )
            for row, item in enumerate(self.prepared)
        ]
