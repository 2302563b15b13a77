"""LlavaAnswerer on tiny random LLaVA-NeXT (CLIP + Llama) and LLaVA-OneVision (SigLIP + Qwen2)
models: the planned visual tokens reach the language model exactly, frames are encoded the way
the model does it, generation / streaming / batching agree, limits fail loudly, and a saved
model loads back offline."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from freevllm_tools.answerer import (
    FAMILIES,
    Generation,
    LlavaAnswerer,
    get_family,
    list_families,
    timing_context,
)
from freevllm_tools.errors import InputError, ModelError
from freevllm_tools.testing import tiny_llava_next, tiny_llava_onevision

ROOT = Path(__file__).resolve().parents[1]
BUILDERS = {"llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def answerer(request) -> LlavaAnswerer:
    return BUILDERS[request.param](seed=0)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(5, 40, 60, 3), dtype=np.uint8)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def visual(answerer: LlavaAnswerer, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, answerer.hidden_size, generator=generator).to(answerer.dtype)


def script_logits(answerer: LlavaAnswerer, monkeypatch, script: list[int]) -> None:
    """Make the model emit ``script`` (through the real cached forward, logits replaced)."""
    real = answerer._forward
    step = {"i": 0}

    def forward(cache, **inputs):
        logits = real(cache, **inputs)
        forced = torch.full_like(logits, -1e4)
        forced[:, script[min(step["i"], len(script) - 1)]] = 0.0
        step["i"] += 1
        return forced

    monkeypatch.setattr(answerer, "_forward", forward)


# ----------------------------------------------------------------------------- registry, builders


def test_family_registry_by_model_type():
    assert list_families() == ["llava_next", "llava_onevision"]
    assert get_family("llava_next").model_class == "LlavaNextForConditionalGeneration"
    assert get_family("llava_onevision").model_class == "LlavaOnevisionForConditionalGeneration"
    with pytest.raises(ModelError, match="llava_next, llava_onevision"):
        get_family("llava_next_video_but_not_really")
    assert set(FAMILIES) == set(list_families())


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_tiny_builders_are_deterministic_and_leave_global_rng(family):
    build = BUILDERS[family]
    state = torch.random.get_rng_state()
    first, again, other = build(seed=0), build(seed=0), build(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.identity == again.identity != other.identity
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert first.family.model_type == family
    assert first.language_model.rotary_emb.rope_type == "dynamic"


# ----------------------------------------------------------------------------- frames -> tokens


def test_encode_frames_shape_grid_and_width(answerer, frames):
    tokens = answerer.encode_frames(frames, batch_size=2)
    expected_grid = {"llava_next": (6, 6), "llava_onevision": (7, 7)}[answerer.family.model_type]
    assert answerer.grid_size == expected_grid
    assert tokens.shape == (5, *expected_grid, answerer.hidden_size)
    assert tokens.dtype == answerer.dtype and tokens.device == answerer.device
    assert torch.allclose(tokens, answerer.encode_frames(frames, batch_size=8), atol=1e-5)
    assert answerer.encode_frames(frames[:0]).shape == (0, *expected_grid, answerer.hidden_size)


def _model_image_features(answerer: LlavaAnswerer, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's own path for one image: ``get_image_features`` with the any-res tiles all
    equal to the image; the first ``h*w`` packed tokens are the base image's."""
    model_module = __import__(type(answerer.model).__module__, fromlist=["image_size_to_num_patches"])
    config = answerer.model.config
    height, width = answerer.image_size
    num_patches = model_module.image_size_to_num_patches(
        image_size=(height, width),
        grid_pinpoints=config.image_grid_pinpoints,
        patch_size=config.vision_config.image_size,
    )
    stacked = pixel_values[None].expand(1, num_patches, *pixel_values.shape).contiguous()
    with torch.no_grad():
        outputs = answerer.model.get_image_features(
            pixel_values=stacked, image_sizes=torch.tensor([[height, width]]), return_dict=True
        )
    packed = outputs.pooler_output[0]
    rows, columns = answerer.grid_size
    return packed[: rows * columns].reshape(rows, columns, -1)


def test_encode_frames_equals_the_models_own_vision_path(answerer, frames):
    tokens = answerer.encode_frames(frames[:2])
    pixel_values = answerer.preprocess(frames[:2])
    for i in range(2):
        reference = _model_image_features(answerer, pixel_values[i])
        assert torch.allclose(tokens[i], reference, atol=1e-5), (tokens[i] - reference).abs().max()
    # and differs from a neighbouring layer's features: the layer choice is seen
    saved = answerer.vision_feature_layer
    answerer.vision_feature_layer = -3
    try:
        assert not torch.allclose(answerer.encode_frames(frames[:1])[0], tokens[0], atol=1e-3)
    finally:
        answerer.vision_feature_layer = saved


def test_encode_frames_with_a_list_of_feature_layers(frames):
    answerer = tiny_llava_next(seed=2, vision_feature_layer=[-3, -1])
    tokens = answerer.encode_frames(frames[:1])
    reference = _model_image_features(answerer, answerer.preprocess(frames[:1])[0])
    assert tokens.shape == (1, 6, 6, answerer.hidden_size)
    assert torch.allclose(tokens[0], reference, atol=1e-5)


def test_preprocess_resizes_without_keeping_aspect_and_normalises(answerer):
    # A wide frame with three vertical bands: after "resize" each band still covers a third.
    frame = np.zeros((1, 30, 90, 3), dtype=np.uint8)
    frame[:, :, :30] = (255, 0, 0)
    frame[:, :, 30:60] = (0, 255, 0)
    frame[:, :, 60:] = (0, 0, 255)
    pixels = answerer.preprocess(frame)[0]
    height, width = answerer.image_size
    assert pixels.shape == (3, height, width)
    mean = answerer.image_mean.flatten()
    std = answerer.image_std.flatten()
    red = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    blue = (torch.tensor([0.0, 0.0, 1.0]) - mean) / std
    assert torch.allclose(pixels[:, height // 2, 2], red, atol=1e-5)
    assert torch.allclose(pixels[:, height // 2, width - 3], blue, atol=1e-5)
    # A frame already at the model's size is only normalised, exactly.
    flat = np.full((1, height, width, 3), 51, dtype=np.uint8)
    expected = (torch.full((3,), 51 / 255.0) - mean) / std
    assert torch.allclose(answerer.preprocess(flat)[0][:, 0, 0], expected, atol=1e-6)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8, 4), np.uint8)],
)
def test_encode_frames_rejects_bad_arrays(bad):
    answerer = tiny_llava_next(seed=0)
    with pytest.raises(InputError, match="uint8"):
        answerer.encode_frames(bad)


# ----------------------------------------------------------------------------- prompt and splice


def test_prompt_formats(answerer):
    prompt = answerer.build_prompt("What is the man doing <image> now?")
    assert prompt.count(answerer.image_token) == 1  # the question's "<image>" is removed
    assert prompt.endswith("In the video,")
    ids = answerer.tokenize_prompt("What is the man doing?")
    assert int((ids == answerer.image_token_id).sum()) == 1
    if answerer.family.model_type == "llava_next":
        assert answerer.prompt_format == "vicuna"
        assert ids[0].item() == answerer.tokenizer.bos_token_id
        assert " USER: <image>\n" in prompt and prompt.endswith("ASSISTANT: In the video,")
    else:
        assert answerer.prompt_format == "chat_template"
        assert prompt.startswith("<|im_start|>system\n")
        assert "<|im_start|>user\n<image>\n" in prompt
        assert prompt.endswith("<|im_start|>assistant\nIn the video,")
    with pytest.raises(InputError, match="empty"):
        answerer.build_prompt("  <image> ")


def test_timing_context_names_the_key_frames_and_the_duration():
    assert timing_context([0.4, 1.25, 3.0], 5.0) == (
        "The video lasts 5.0 seconds; its key frames are at 0.4, 1.2 and 3.0 seconds."
    )
    assert timing_context([2.0], None) == "The key frames are at 2.0 seconds."
    assert timing_context([], 61.04) == "The video lasts 61.0 seconds."
    assert timing_context([], None) == timing_context([], 0.0) == ""


def test_context_goes_before_the_instruction_and_cannot_add_a_placeholder(answerer):
    plain = answerer.build_prompt("What is the man doing?")
    timed = answerer.build_prompt("What is the man doing?", "The video lasts 3.0 seconds. <image>")
    assert timed.count(answerer.image_token) == 1
    assert "The video lasts 3.0 seconds. These are key frames" in timed
    assert timed.replace("The video lasts 3.0 seconds. ", "") == plain
    assert answerer.build_prompt("What is the man doing?", "  ") == plain
    tokens = visual(answerer, 5)
    prepared = answerer.prepare("What?", tokens, context="The video lasts 3.0 seconds.")
    assert len(prepared.input_ids) > len(answerer.prepare("What?", tokens).input_ids)
    batch = answerer.answer_batch(["What?"], [tokens], contexts=["The video lasts 3.0 seconds."], max_new_tokens=4)
    single = answerer.answer("What?", tokens, context="The video lasts 3.0 seconds.", max_new_tokens=4)
    assert batch[0].token_ids == single.token_ids
    assert batch[0].num_prompt_tokens == prepared.num_tokens


@pytest.mark.parametrize("num_visual", [1, 17, 49])
def test_language_model_receives_exactly_the_planned_visual_tokens(answerer, num_visual):
    tokens = visual(answerer, num_visual, seed=num_visual)
    captured = []

    def hook(module, args, kwargs):
        captured.append(kwargs["inputs_embeds"].detach().clone())

    handle = answerer.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generation = answerer.answer("What is the man doing?", tokens, max_new_tokens=3)
    finally:
        handle.remove()

    ids = answerer.tokenize_prompt("What is the man doing?")
    position = int((ids == answerer.image_token_id).nonzero()[0])
    prefill = captured[0][0]
    assert prefill.shape[0] == len(ids) - 1 + num_visual == generation.num_prompt_tokens
    assert torch.equal(prefill[position : position + num_visual], tokens)
    embed = answerer.model.get_input_embeddings()
    with torch.no_grad():
        text = embed(ids)
    assert torch.equal(prefill[:position], text[:position])
    assert torch.equal(prefill[position + num_visual :], text[position + 1 :])
    # then one embedding per decoding step, never the visual sequence again
    assert all(step.shape[1] == 1 for step in captured[1:])
    assert len(captured) == generation.num_new_tokens


def test_prepare_reports_the_splice(answerer):
    tokens = visual(answerer, 11)
    prepared = answerer.prepare("What colour is the car?", tokens)
    assert prepared.num_visual_tokens == 11
    assert prepared.num_tokens == len(prepared.input_ids) - 1 + 11
    assert prepared.input_ids[prepared.image_position] == answerer.image_token_id
    assert torch.equal(prepared.inputs_embeds[prepared.image_position : prepared.image_position + 11], tokens)


def test_bad_visual_tokens_are_refused(answerer):
    with pytest.raises(ModelError, match=f"expects {answerer.hidden_size}"):
        answerer.answer("What?", torch.zeros(4, answerer.hidden_size + 1))
    with pytest.raises(InputError, match="empty"):
        answerer.answer("What?", torch.zeros(0, answerer.hidden_size))
    with pytest.raises(InputError, match=r"\(N, D\)"):
        answerer.answer("What?", torch.zeros(2, 3, answerer.hidden_size))
    with pytest.raises(InputError, match="max_new_tokens"):
        answerer.answer("What?", visual(answerer, 3), max_new_tokens=0)


# ----------------------------------------------------------------------------- generation


def test_answer_generates_text_with_timings(answerer, frames):
    tokens = answerer.encode_frames(frames).reshape(-1, answerer.hidden_size)[:40]
    generation = answerer.answer("What is happening?", tokens, max_new_tokens=6)
    assert isinstance(generation, Generation)
    assert generation.text.startswith("In the video,") and len(generation.text) > len("In the video,")
    assert 1 <= generation.num_new_tokens <= 6
    assert generation.prefill_s > 0
    if generation.num_new_tokens > 1:
        assert generation.generate_s > 0 and generation.tokens_per_s > 0
    assert generation.finish_reason in {"stop", "length"}
    # greedy is deterministic
    assert answerer.answer("What is happening?", tokens, max_new_tokens=6).token_ids == generation.token_ids


def test_max_new_tokens_bounds_the_answer(answerer):
    answerer_eos = answerer.eos_token_ids
    answerer.eos_token_ids = set()  # never stop early
    try:
        for limit in (1, 4):
            generation = answerer.answer("What?", visual(answerer, 5), max_new_tokens=limit)
            assert generation.num_new_tokens == limit == len(generation.token_ids)
            assert generation.finish_reason == "length"
    finally:
        answerer.eos_token_ids = answerer_eos


def test_stops_at_eos_and_decodes_word_pieces_and_multibyte_characters(monkeypatch):
    # A byte-level tokenizer splits "日本" into byte tokens; streaming must never show half a
    # character, and the end-of-sequence token ends the answer without appearing in it.
    answerer = tiny_llava_onevision(seed=0)
    tokenizer = answerer.tokenizer
    continuation = " the dog runs 日本 quickly."
    script = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    assert len(script) > len(continuation.split())  # word pieces and bytes, not whole words
    eos = tokenizer.eos_token_id
    script_logits(answerer, monkeypatch, [*script, eos, *script])
    pieces = list(answerer.stream("What?", visual(answerer, 8), max_new_tokens=64))
    assert "".join(pieces) == "In the video," + continuation
    assert not any("\ufffd" in piece for piece in pieces)
    script_logits(answerer, monkeypatch, [*script, eos, *script])
    generation = answerer.answer("What?", visual(answerer, 8), max_new_tokens=64)
    assert generation.text == "In the video," + continuation
    assert generation.finish_reason == "stop"
    assert generation.num_new_tokens == len(script) + 1
    assert generation.token_ids == script


def test_sentencepiece_style_spaces_survive_streaming(monkeypatch):
    answerer = tiny_llava_next(seed=0)
    continuation = " a man is playing the guitar."
    script = answerer.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    script_logits(answerer, monkeypatch, [*script, answerer.tokenizer.eos_token_id])
    pieces = list(answerer.stream("What?", visual(answerer, 8), max_new_tokens=64))
    assert "".join(pieces) == "In the video, a man is playing the guitar."
    assert len(pieces) > 2


@pytest.mark.parametrize("seed", [0, 1])
def test_stream_joins_to_the_answer(answerer, seed):
    tokens = visual(answerer, 30, seed=seed)
    finished = []
    stream = answerer.stream("Describe the video.", tokens, max_new_tokens=24, on_finish=finished.append)
    pieces = list(stream)
    generation = answerer.answer("Describe the video.", tokens, max_new_tokens=24)
    assert "".join(pieces) == generation.text
    assert all(pieces) and len(pieces) >= 2
    assert finished[0].token_ids == generation.token_ids
    assert finished[0].num_new_tokens == generation.num_new_tokens


def test_answer_batch_equals_one_by_one(answerer):
    questions = ["What is the man doing?", "How many people are there?", "What colour is the car?"]
    sequences = [visual(answerer, n, seed=n) for n in (9, 40, 23)]
    batch = answerer.answer_batch(questions, sequences, max_new_tokens=10)
    single = [answerer.answer(q, v, max_new_tokens=10) for q, v in zip(questions, sequences)]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert [b.text for b in batch] == [s.text for s in single]
    assert [b.num_prompt_tokens for b in batch] == [s.num_prompt_tokens for s in single]
    assert len({b.num_prompt_tokens for b in batch}) == 3  # really padded
    with pytest.raises(InputError, match="one of each per question"):
        answerer.answer_batch(questions, sequences[:2])
    assert answerer.answer_batch([], []) == []


def test_sampling_is_reproducible_with_a_seed(answerer):
    tokens = visual(answerer, 12)
    first = answerer.answer("What?", tokens, max_new_tokens=8, temperature=1.0, seed=3)
    again = answerer.answer("What?", tokens, max_new_tokens=8, temperature=1.0, seed=3)
    assert first.token_ids == again.token_ids


# ----------------------------------------------------------------------------- context and RoPE


def test_context_overflow_raises_before_the_model_runs():
    answerer = tiny_llava_next(seed=0, max_position_embeddings=64, rope_scaling_factor=2.0)
    assert answerer.max_context == 128
    called = []
    handle = answerer.language_model.register_forward_pre_hook(lambda *a: called.append(1))
    try:
        with pytest.raises(ModelError) as error:
            answerer.answer("What is the man doing?", visual(answerer, 200), max_new_tokens=16)
    finally:
        handle.remove()
    assert not called
    message = str(error.value)
    text_tokens = len(answerer.tokenize_prompt("What is the man doing?")) - 1
    expected = ("200 visual", f"{text_tokens} text", "16 new tokens", "128", "max_position_embeddings 64", "factor 2")
    for number in expected:
        assert number in message, (number, message)


def test_dynamic_rope_factor_sets_config_and_context():
    scaled = tiny_llava_next(seed=0, max_position_embeddings=64, rope_scaling_factor=2.0)
    plain = tiny_llava_next(seed=0, max_position_embeddings=64, rope_scaling_factor=None)
    parameters = scaled.model.config.text_config.rope_parameters
    assert parameters["rope_type"] == "dynamic" and parameters["factor"] == 2.0
    assert plain.model.config.text_config.rope_parameters["rope_type"] == "default"
    assert (scaled.max_context, plain.max_context) == (128, 64)
    # A prompt past 64 positions fits the scaled model only.
    num_visual = 70 - (len(scaled.tokenize_prompt("What?")) - 1)
    tokens = visual(scaled, max(num_visual, 1))
    generation = scaled.answer("What?", tokens, max_new_tokens=4)
    assert generation.num_prompt_tokens >= 70
    with pytest.raises(ModelError, match="exceeds the context"):
        plain.answer("What?", tokens, max_new_tokens=4)
    # Dynamic NTK changes nothing within the original context.
    short = visual(scaled, 5)
    assert scaled.answer("What?", short, max_new_tokens=5).token_ids == plain.answer(
        "What?", short, max_new_tokens=5
    ).token_ids


def test_an_answer_does_not_depend_on_the_one_before():
    # transformers' dynamic RoPE keeps the frequencies of the longest sequence seen until a
    # sequence shorter than the original context comes; the answerer resets them per answer.
    fresh = tiny_llava_next(seed=0, max_position_embeddings=64, rope_scaling_factor=2.0)
    used = tiny_llava_next(seed=0, max_position_embeddings=64, rope_scaling_factor=2.0)
    text = len(fresh.tokenize_prompt("What?")) - 1
    medium, long = visual(fresh, 80 - text, seed=1), visual(fresh, 120 - text, seed=2)
    used.answer("What?", long, max_new_tokens=4)
    expected = fresh.answer("What?", medium, max_new_tokens=6)
    assert used.answer("What?", medium, max_new_tokens=6).token_ids == expected.token_ids


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_save_and_load_back_offline(family, tmp_path, monkeypatch, no_network, frames):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = BUILDERS[family](seed=4)
    directory = original.save_pretrained(tmp_path / "tiny-model")
    assert (directory / "config.json").is_file()
    loaded = LlavaAnswerer.from_pretrained(directory)
    assert loaded.family.model_type == family
    assert (loaded.device.type, loaded.dtype) == ("cpu", torch.float32)  # no CUDA here
    assert loaded.identity.startswith("tiny-model@")
    assert LlavaAnswerer.from_pretrained(str(directory)).identity == loaded.identity
    assert loaded.model.config.text_config.rope_parameters["rope_type"] == "dynamic"
    assert (loaded.grid_size, loaded.image_size, loaded.max_context) == (
        original.grid_size,
        original.image_size,
        original.max_context,
    )
    assert torch.equal(loaded.image_mean, original.image_mean)
    assert torch.equal(loaded.encode_frames(frames), original.encode_frames(frames))
    tokens = visual(original, 20)
    assert loaded.build_prompt("What?") == original.build_prompt("What?")
    assert loaded.answer("What?", tokens, max_new_tokens=6).token_ids == original.answer(
        "What?", tokens, max_new_tokens=6
    ).token_ids


def test_missing_or_unsupported_models_raise_model_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="does not exist"):
        LlavaAnswerer.from_pretrained(tmp_path / "nowhere")
    no_config = tmp_path / "weights-only"
    no_config.mkdir()
    with pytest.raises(ModelError, match="cannot load the config of model .*weights-only"):
        LlavaAnswerer.from_pretrained(no_config)
    with pytest.raises(ModelError, match="hf download freevllm-tests/no-such-model"):
        LlavaAnswerer.from_pretrained("freevllm-tests/no-such-model")

    from transformers import LlamaConfig

    unsupported = tmp_path / "llama-only"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(unsupported)
    with pytest.raises(ModelError, match="'llama' is not a supported LLaVA family"):
        LlavaAnswerer.from_pretrained(unsupported)


# ----------------------------------------------------------------------------- benchmark smoke test


def test_gpu_prefill_benchmark_runs_tiny_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_prefill", ROOT / "benchmarks" / "gpu_prefill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "prefill.json"
    assert module.main(["--tiny", "--repeats", "2", "--new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["visual_tokens"]: row for row in report["results"]}
    assert len(rows) == 3 and all(row["prefill_s_median"] > 0 for row in rows.values())
    assert all(row["num_prompt_tokens"] > row["visual_tokens"] for row in rows.values())
    assert "| visual tokens |" in capsys.readouterr().out
