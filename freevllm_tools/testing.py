"""Tiny models and test media for the project's tests and for users' own tests.

Everything here runs offline in seconds on a CPU: random-weight models built from configs,
and videos written with PyAV. Nothing here downloads anything.
"""

from __future__ import annotations


# -- tiny CLIP guide -------------------------------------------------------------------------
# A self-contained block: random-weight open_clip CLIP models small enough for unit tests.
# They use CLIP's own BPE tokenizer (open_clip.SimpleTokenizer ships its vocabulary), so they
# build offline; the text tower's vocabulary must cover its ids, a small width keeps it tiny.

#: Token ids CLIP's BPE tokenizer (``open_clip.SimpleTokenizer``) can emit.
CLIP_VOCAB_SIZE = 49408


def tiny_clip_config(
    *,
    image_size: int | tuple[int, int] = 48,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    embed_dim: int = 32,
    context_length: int = 32,
    vocab_size: int = CLIP_VOCAB_SIZE,
) -> dict:
    """An open_clip model config for a tiny CLIP (ViT image tower and text tower alike).

    ``image_size`` is ``H`` or ``(H, W)`` pixels; each side must be a multiple of ``patch_size``,
    giving a ``(H // patch_size, W // patch_size)`` patch grid. ``width`` must divide by ``heads``.
    """
    from .errors import InputError

    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sides) != 2 or any(s < 1 or s % patch_size for s in sides):
        raise InputError(f"image_size {image_size!r} must be positive multiples of patch_size {patch_size}")
    if width % heads:
        raise InputError(f"width {width} must be a multiple of heads {heads}")
    if vocab_size < CLIP_VOCAB_SIZE:
        raise InputError(f"vocab_size {vocab_size} is below CLIP's tokenizer size {CLIP_VOCAB_SIZE}")
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": sides[0] if sides[0] == sides[1] else list(sides),
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": width // heads,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": width,
            "heads": heads,
            "layers": layers,
        },
    }


def tiny_clip_guide(
    seed: int = 0,
    *,
    image_size: int | tuple[int, int] = 48,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    embed_dim: int = 32,
    context_length: int = 32,
    vocab_size: int = CLIP_VOCAB_SIZE,
    device: str | None = "cpu",
    dtype: object = None,
):
    """A random-weight :class:`~freevllm_tools.guide.ClipGuide`, the same for the same ``seed``.

    Built offline in well under a second from :func:`tiny_clip_config`; torch's global random
    state is left as it was. Its ``identity`` is ``"tiny-clip@<digest of config and weights>"``.
    """
    import torch

    from .guide import ClipGuide

    config = tiny_clip_config(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        heads=heads,
        embed_dim=embed_dim,
        context_length=context_length,
        vocab_size=vocab_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClipGuide.from_config(config, name="tiny-clip", device=device, dtype=dtype)


# -- test videos -----------------------------------------------------------------------------
# A self-contained block: write real video files with PyAV whose frames say which frame they are.

import os as _os
from collections.abc import Iterable as _Iterable
from fractions import Fraction as _Fraction
from pathlib import Path as _Path

import numpy as _np

#: Bits of the frame number drawn in the band at the top of each synthetic frame.
FRAME_NUMBER_BITS = 10


def synthetic_frame(index: int, size: tuple[int, int] = (64, 48), *, seed: int = 0) -> _np.ndarray:
    """One upright test picture, ``(height, width, 3)`` uint8 RGB, that says which frame it is.

    - rows ``[0, band)``: ``index`` in :data:`FRAME_NUMBER_BITS` black/white cells, most
      significant bit on the left (read it back with :func:`read_frame_number`);
    - a bright square that moves right by a few pixels a frame;
    - a red marker in the bottom-left corner, so a test can tell a rotated or mirrored
      picture from an upright one.

    ``seed`` picks the background colour; everything else depends only on ``index``.
    """
    width, height = size
    rng = _np.random.default_rng(seed)
    image = _np.empty((height, width, 3), dtype=_np.uint8)
    image[:] = rng.integers(24, 72, size=3, dtype=_np.uint8)
    band = _band_height(height)
    cell = width // FRAME_NUMBER_BITS
    for bit in range(FRAME_NUMBER_BITS):
        on = (index >> (FRAME_NUMBER_BITS - 1 - bit)) & 1
        image[:band, bit * cell : (bit + 1) * cell] = 255 if on else 0
    side = max(2, height // 5)
    span = max(1, width - side)
    x = (index * 3) % span
    y = band + (height - band - side) // 2
    image[y : y + side, x : x + side] = (250, 230, 40)
    marker = max(2, height // 6)
    image[height - marker :, :marker] = (230, 20, 20)
    return image


def read_frame_number(image: _np.ndarray) -> int:
    """The frame number :func:`synthetic_frame` drew in ``image`` (upright, ``(H, W, 3)``)."""
    height, width = image.shape[:2]
    band = _band_height(height)
    cell = width // FRAME_NUMBER_BITS
    luma = image[:band].astype(_np.float32).mean(axis=2)
    rows = slice(band // 4, band - band // 4)
    value = 0
    for bit in range(FRAME_NUMBER_BITS):
        left, right = bit * cell + cell // 4, (bit + 1) * cell - cell // 4
        value = (value << 1) | int(luma[rows, left:right].mean() > 128)
    return value


def _band_height(height: int) -> int:
    return max(4, height // 6)


def write_video(
    path: str | _Path,
    frames: _np.ndarray | _Iterable[_np.ndarray] | None = None,
    *,
    num_frames: int = 30,
    size: tuple[int, int] = (64, 48),
    fps: _Fraction | int = _Fraction(30000, 1001),
    codec: str = "libx264",
    rotation: int = 0,
    seed: int = 0,
    keyframe_interval: int | None = None,
) -> _Path:
    """Write a real video file with PyAV and return its path.

    ``frames`` are upright ``(H, W, 3)`` uint8 RGB pictures (an array ``(T, H, W, 3)`` or any
    iterable); ``None`` writes ``num_frames`` pictures from :func:`synthetic_frame` at ``size``
    ``(width, height)``. Frame ``i`` gets the presentation time ``i / fps`` exactly.

    ``rotation`` (0, 90, 180 or 270) is the clockwise turn a player applies for display, as
    in :attr:`freevllm_tools.video.VideoInfo.rotation`: the file stores each picture turned
    the other way and carries the turn as a display matrix (what phones write), so a reader
    that honours it gives back the upright pictures. The container follows the suffix
    (``.mp4``, ``.mkv``, ``.mov``, ``.avi``); ``codec`` is ``"libx264"`` or ``"mpeg4"``
    (or any encoder FFmpeg has for the container). ``keyframe_interval`` sets the encoder's
    GOP size (frames between keyframes), e.g. to make seeking matter in a short file.
    """
    import av

    from .errors import InputError

    if rotation % 90 or not 0 <= rotation < 360:
        raise InputError(f"rotation must be 0, 90, 180 or 270, got {rotation}")
    if frames is None:
        if num_frames < 1:
            raise InputError(f"num_frames must be at least 1, got {num_frames}")
        frames = (synthetic_frame(i, size, seed=seed) for i in range(num_frames))
    path = _Path(path)
    turns = rotation // 90
    with av.open(str(path), mode="w") as container:
        stream = None
        for i, picture in enumerate(frames):
            stored = _np.ascontiguousarray(_np.rot90(_as_rgb(picture), turns))
            if stream is None:
                stream = _add_video_stream(container, codec, _Fraction(fps), stored.shape, rotation)
                if keyframe_interval:
                    stream.codec_context.gop_size = keyframe_interval
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        if stream is None:
            raise InputError("write_video got no frames: pass at least one picture")
        container.mux(stream.encode(None))
    return path


def _as_rgb(picture: _np.ndarray) -> _np.ndarray:
    from .errors import InputError

    array = _np.asarray(picture)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != _np.uint8:
        raise InputError(
            f"frames must be (H, W, 3) uint8 RGB pictures, got {array.dtype} {array.shape}"
        )
    if array.shape[0] % 2 or array.shape[1] % 2:
        raise InputError(
            f"frame sides must be even for yuv420p, got {array.shape[1]}x{array.shape[0]}"
        )
    return array


def _add_video_stream(
    container, codec: str, fps: _Fraction, shape: tuple[int, ...], rotation: int
):
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = shape[1], shape[0]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.time_base = 1 / fps
    if codec == "libx264":
        stream.options = {"crf": "12"}
    else:
        stream.bit_rate = 4_000_000
    if rotation:
        # PyAV's angle is counter-clockwise (as VideoFrame.rotation reads it back);
        # ours is the clockwise turn a player applies.
        stream.set_display_rotation(-rotation)
    return stream


# -- tiny LLaVA answerers --------------------------------------------------------------------
# A self-contained block: random-weight LLaVA-NeXT (CLIP + Llama) and LLaVA-OneVision
# (SigLIP + Qwen2) models with BPE tokenizers trained here, offline, on a few sentences.

_LLAVA_CORPUS = (
    "You are a helpful assistant that answers questions about videos. Answer from what the frames show.",
    "These are key frames sampled from one video, shown in time order. Answer the question about the video.",
    "Question: What is the man doing? What colour is the car? How many people are there?",
    "USER: ASSISTANT: In the video, a man is playing the guitar while a woman sings and dances.",
    "The red square moves to the right. A blue circle appears, then the dog runs away quickly.",
    "system user assistant, 0 1 2 3 4 5 6 7 8 9 café naïve über déjà-vu! (yes) [no] {maybe}",
)

#: Special tokens of the tiny tokenizers, in id order from 0.
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

#: A ChatML template over string contents (what a Qwen2 tokenizer carries).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: A ChatML template over typed contents, images first (what a LLaVA-OneVision processor carries).
CHATML_IMAGE_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer(style: str = "llama", *, vocab_size: int = 384):
    """A small BPE tokenizer built offline with the ``tokenizers`` library, as a transformers
    ``PreTrainedTokenizerFast``. The same for the same arguments.

    - ``"llama"``: SentencePiece-like (Metaspace ``▁`` word starts, ``<unk>`` for characters
      outside printable ASCII), BOS ``<s>`` added in front, EOS ``</s>``, pad ``<pad>``;
      special tokens :data:`LLAMA_SPECIAL_TOKENS`.
    - ``"qwen"``: byte-level (every string encodes, multi-byte characters span tokens), no BOS,
      EOS ``<|im_end|>``, pad ``<|endoftext|>``, the ChatML template; :data:`QWEN_SPECIAL_TOKENS`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .errors import InputError

    if style == "llama":
        specials = LLAMA_SPECIAL_TOKENS
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = [chr(c) for c in range(32, 127)] + ["\u2581", "\n"]
    elif style == "qwen":
        specials = QWEN_SPECIAL_TOKENS
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        raise InputError(f"tokenizer style must be 'llama' or 'qwen', got {style!r}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(_LLAVA_CORPUS, trainer)
    if style == "llama":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            padding_side="left",
            extra_special_tokens={"image_token": "<image>"},
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=CHATML_TEMPLATE,
    )


#: Mean and std of CLIP's (and LLaVA-NeXT's) image preprocessing.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def llava_next_processor(
    tokenizer, image_size: int, patch_size: int, mean, std, pinpoints: list[list[int]]
):
    """A ``LlavaNextProcessor`` for a square ``image_size`` tower with ``patch_size`` patches,
    saved with a model so that ``LlavaAnswerer.from_pretrained`` finds its normalisation."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
        image_grid_pinpoints=pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
    )


def tiny_llava_next(
    seed: int = 0,
    *,
    image_size: int = 48,
    patch_size: int = 8,
    hidden_size: int = 32,
    max_position_embeddings: int = 512,
    rope_scaling_factor: float | None = 2.0,
    vision_feature_layer: int | list[int] = -2,
    device: str | None = "cpu",
):
    """A random-weight LLaVA-NeXT answerer: CLIP vision tower (48 px, patch 8: a 6x6 grid,
    CLS token, features from ``vision_feature_layer`` (-2, or a list to concatenate), the
    ``"default"`` strategy), Llama text model, the
    ``"llama"`` :func:`tiny_tokenizer` and a ``LlavaNextProcessor`` (so that
    ``save_pretrained`` then ``LlavaAnswerer.from_pretrained`` round-trips offline).

    The same weights for the same ``seed``; torch's global random state is left as it was.
    The context is ``max_position_embeddings`` x ``rope_scaling_factor``.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    from .answerer import LlavaAnswerer

    tokenizer = tiny_tokenizer("llama")
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config).eval()
    processor = llava_next_processor(tokenizer, image_size, patch_size, CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, pinpoints)
    return LlavaAnswerer.from_model(
        model.to(device),
        tokenizer,
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
        identity=None,
        rope_scaling_factor=rope_scaling_factor,
        processor=processor,
    )


def tiny_llava_onevision(
    seed: int = 0,
    *,
    image_size: int = 46,
    patch_size: int = 6,
    hidden_size: int = 48,
    max_position_embeddings: int = 512,
    rope_scaling_factor: float | None = 2.0,
    device: str | None = "cpu",
):
    """A random-weight LLaVA-OneVision answerer: SigLIP vision tower (46 px, patch 6: a 7x7
    grid that leaves 4 pixels unused, as 384/14 does; no CLS token, last layer, ``"full"``
    strategy), Qwen2 text model with tied embeddings, the ``"qwen"`` :func:`tiny_tokenizer`
    (ChatML) and a ``LlavaOnevisionProcessor`` carrying an image-aware chat template.

    The same weights for the same ``seed``; torch's global random state is left as it was.
    """
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from .answerer import LlavaAnswerer

    tokenizer = tiny_tokenizer("qwen")
    vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_grid_pinpoints=pinpoints,
    )
    video_processor = LlavaOnevisionVideoProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        vision_feature_select_strategy="full",
        num_image_tokens=(image_size // patch_size) ** 2,
        chat_template=CHATML_IMAGE_TEMPLATE,
    )
    return LlavaAnswerer.from_model(
        model.to(device),
        tokenizer,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        identity=None,
        rope_scaling_factor=rope_scaling_factor,
        processor=processor,
    )


# -- tiny pipeline ---------------------------------------------------------------------------


def tiny_free_video_llm(
    cache_dir: str | _os.PathLike[str] | None = None,
    *,
    family: str = "llava_next",
    seed: int = 0,
    config: object = "paper",
    max_new_tokens: int = 16,
):
    """A ``FreeVideoLLM`` on tiny random models: the whole pipeline, offline, in seconds.

    ``family`` picks the answerer (``"llava_next"`` or ``"llava_onevision"``); with a
    ``cache_dir`` the pipeline reads and writes a feature cache there, without one it keeps
    nothing between questions. Answers are random text: use it to test wiring, not meaning.
    """
    from .pipeline import FreeVideoLLM

    builders = {"llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision}
    if family not in builders:
        msg = f"unknown tiny answerer family {family!r}; expected one of {sorted(builders)}"
        raise ValueError(msg)
    cache = None
    if cache_dir is not None:
        from .cache import FeatureCache

        cache = FeatureCache(cache_dir)
    return FreeVideoLLM(
        tiny_clip_guide(seed),
        builders[family](seed, max_position_embeddings=2048),
        config,  # type: ignore[arg-type]
        cache=cache,
        max_new_tokens=max_new_tokens,
    )
