"""ClipGuide on tiny random open_clip models: shapes, normalisation, locality, loading, errors.

Nothing here downloads anything: every model is built from a config with random weights, and
the tests of failed loads run with the network cut off and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import copy
import json
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freevllm_tools.errors import InputError, ModelError
from freevllm_tools.guide import ClipGuide, GuideFeatures, available_models, available_weights
from freevllm_tools.testing import tiny_clip_config, tiny_clip_guide

# Non-square on purpose: a (rows, columns) mix-up shows as a wrong shape or a wrong cell.
IMAGE_SIZE = (48, 64)  # (H, W) pixels -> (6, 8) patches of 8


@pytest.fixture(scope="module")
def guide() -> ClipGuide:
    return tiny_clip_guide(0, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 36, 50, 3), dtype=np.uint8)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list:
    """Hugging Face offline mode, and every socket refused; returns the refused attempts."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def assert_same_outputs(a: ClipGuide, b: ClipGuide, frames: np.ndarray) -> None:
    fa, fb = a.encode_frames(frames), b.encode_frames(frames)
    assert torch.equal(fa.pooled, fb.pooled)
    assert torch.equal(fa.dense, fb.dense)
    texts = ["a red ball", "a dog on a sofa"]
    assert torch.equal(a.encode_text(texts), b.encode_text(texts))


# -- shapes, dtypes, normalisation ------------------------------------------------------------


def test_attributes_follow_the_config(guide: ClipGuide) -> None:
    assert guide.image_size == (48, 64)
    assert guide.grid_size == (6, 8)
    assert guide.embed_dim == 32
    assert guide.device == torch.device("cpu")
    assert guide.dtype == torch.float32
    assert guide.identity.startswith("tiny-clip@")


def test_output_shapes_dtypes_and_unit_norm(guide: ClipGuide, frames: np.ndarray) -> None:
    features = guide.encode_frames(frames)
    assert isinstance(features, GuideFeatures)
    assert len(features) == 5
    assert features.pooled.shape == (5, 32)
    assert features.dense.shape == (5, 6, 8, 32)
    text = guide.encode_text(["a red ball", "a blue cube", "nothing"])
    assert text.shape == (3, 32)
    for tensor in (features.pooled, features.dense, text):
        assert tensor.dtype == torch.float32
        assert tensor.device.type == "cpu"
        torch.testing.assert_close(tensor.norm(dim=-1), torch.ones(tensor.shape[:-1]))


def test_empty_inputs_give_empty_outputs(guide: ClipGuide) -> None:
    features = guide.encode_frames(np.zeros((0, 10, 10, 3), dtype=np.uint8))
    assert features.pooled.shape == (0, 32)
    assert features.dense.shape == (0, 6, 8, 32)
    assert guide.encode_text([]).shape == (0, 32)


def test_batching_does_not_change_results(guide: ClipGuide, frames: np.ndarray) -> None:
    batched = guide.encode_frames(frames, batch_size=3, progress=True)
    singles = [guide.encode_frames(frames[i : i + 1], batch_size=1) for i in range(len(frames))]
    torch.testing.assert_close(batched.pooled, torch.cat([s.pooled for s in singles]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.dense, torch.cat([s.dense for s in singles]), atol=1e-5, rtol=0)
    texts = [f"frame number {i}" for i in range(5)]
    torch.testing.assert_close(
        guide.encode_text(texts, batch_size=2),
        torch.cat([guide.encode_text([t]) for t in texts]),
        atol=1e-5,
        rtol=0,
    )


def test_torch_frames_match_numpy_frames(guide: ClipGuide, frames: np.ndarray) -> None:
    from_numpy = guide.encode_frames(frames)
    from_torch = guide.encode_frames(torch.from_numpy(frames))
    assert torch.equal(from_numpy.pooled, from_torch.pooled)
    assert torch.equal(from_numpy.dense, from_torch.dense)


def test_text_is_truncated_to_the_context_and_texts_differ(guide: ClipGuide) -> None:
    long_text = " ".join(["word"] * 200)  # far beyond the tiny context of 32 tokens
    embeddings = guide.encode_text([long_text, "a red ball", "a blue cube"])
    assert embeddings.shape == (3, 32)
    assert not torch.allclose(embeddings[1], embeddings[2])
    torch.testing.assert_close(guide.encode_text("a red ball"), embeddings[1:2])


# -- what the features are --------------------------------------------------------------------


def test_pooled_and_dense_are_open_clips_embeddings(guide: ClipGuide, frames: np.ndarray) -> None:
    """pooled = encode_image; dense = the final-layer-norm patch tokens through visual.proj."""
    features = guide.encode_frames(frames)
    pixels = guide.preprocess(frames)
    visual = copy.deepcopy(guide.model.visual)
    visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = visual(pixels)
        image = guide.model.encode_image(pixels, normalize=True)
    torch.testing.assert_close(features.pooled, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(features.pooled, F.normalize(pooled, dim=-1), atol=1e-5, rtol=0)
    dense = F.normalize(tokens @ visual.proj, dim=-1).reshape(5, 6, 8, 32)
    torch.testing.assert_close(features.dense, dense, atol=1e-5, rtol=0)
    # the projection matters: unprojected tokens have the tower's width, not D
    assert visual.proj.shape == (32, 32) and not torch.allclose(visual.proj, torch.eye(32))


@pytest.mark.parametrize("cell", [(1, 6), (4, 1)])
def test_dense_token_follows_its_image_region(guide: ClipGuide, cell: tuple[int, int]) -> None:
    """Changing one region changes the token of that cell, and barely the far cells."""
    # frames at twice the model size: a 16x16 pixel block maps onto one 8x8 patch
    base = np.full((1, 96, 128, 3), 90, dtype=np.uint8)
    changed = base.copy()
    row, col = cell
    changed[0, 16 * row : 16 * (row + 1), 16 * col : 16 * (col + 1)] = (250, 30, 200)
    features = guide.encode_frames(np.concatenate([base, changed]))
    change = 1 - (features.dense[0] * features.dense[1]).sum(-1)  # (h, w) cosine distance
    assert change.shape == (6, 8)
    assert divmod(int(change.argmax()), 8) == cell
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(8), indexing="ij")
    far = torch.maximum((rows - row).abs(), (cols - col).abs()) >= 2
    assert change[row, col] > 20 * change[far].max()


def test_preprocess_resizes_without_cropping(guide: ClipGuide) -> None:
    """A 1:8 frame is squashed to the model size: its left and right edges survive."""
    frame = np.zeros((1, 20, 160, 3), dtype=np.uint8)
    frame[0, :, :40] = (255, 0, 0)  # left quarter red; a centre crop would cut it away
    frame[0, :, 120:] = (0, 0, 255)  # right quarter blue
    pixels = guide.preprocess(frame)
    assert pixels.shape == (1, 3, 48, 64)
    mean = torch.tensor(guide.preprocess_cfg["mean"])
    std = torch.tensor(guide.preprocess_cfg["std"])
    red = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    black = (torch.zeros(3) - mean) / std
    blue = (torch.tensor([0.0, 0.0, 1.0]) - mean) / std
    torch.testing.assert_close(pixels[0, :, 24, 4], red, atol=1e-3, rtol=0)
    torch.testing.assert_close(pixels[0, :, 24, 32], black, atol=1e-3, rtol=0)
    torch.testing.assert_close(pixels[0, :, 24, 60], blue, atol=1e-3, rtol=0)


# -- determinism and identity -----------------------------------------------------------------


def test_same_seed_same_model_other_seed_other_model(guide: ClipGuide, frames: np.ndarray) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    again = tiny_clip_guide(0, image_size=IMAGE_SIZE)
    assert torch.equal(torch.rand(1), expected_draw)  # the global generator is left alone
    assert again.identity == guide.identity
    assert_same_outputs(guide, again, frames)

    other = tiny_clip_guide(1, image_size=IMAGE_SIZE)
    assert other.identity != guide.identity
    assert not torch.allclose(other.encode_frames(frames).pooled, guide.encode_frames(frames).pooled)


def test_identity_tracks_weights_and_config(guide: ClipGuide) -> None:
    model = copy.deepcopy(guide.model)
    same = ClipGuide(model, guide.tokenizer, model_config=guide.model_config, name="tiny-clip")
    assert same.identity == guide.identity
    with torch.no_grad():
        model.visual.proj[0, 0] += 1e-3
    nudged = ClipGuide(model, guide.tokenizer, model_config=guide.model_config, name="tiny-clip")
    assert nudged.identity != guide.identity
    other_config = {**guide.model_config, "quick_gelu": True}
    relabelled = ClipGuide(
        copy.deepcopy(guide.model), guide.tokenizer, model_config=other_config, name="tiny-clip"
    )
    assert relabelled.identity != guide.identity


# -- loading through the normal paths, offline -------------------------------------------------


def test_save_pretrained_round_trip(guide, frames, tmp_path, offline) -> None:
    directory = guide.save_pretrained(tmp_path / "tiny")
    assert (directory / "open_clip_config.json").is_file()
    assert (directory / "open_clip_model.safetensors").is_file()
    loaded = ClipGuide.from_pretrained(directory)
    assert loaded.identity == guide.identity
    assert (loaded.image_size, loaded.grid_size) == (guide.image_size, guide.grid_size)
    assert_same_outputs(guide, loaded, frames)
    assert offline == []


def test_checkpoint_file_with_a_config(guide, frames, tmp_path, offline) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in guide.model.state_dict().items()}
    safetensors_path = tmp_path / "tiny.safetensors"
    save_file(state, safetensors_path)
    torch_path = tmp_path / "tiny.pt"
    torch.save(state, torch_path)  # a plain state dict: loads with weights_only=True
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(guide.model_config))

    loaded = [
        ClipGuide.from_pretrained(guide.model_config, pretrained=safetensors_path),
        ClipGuide.from_config(config_path, checkpoint=torch_path, name="tiny-clip"),
        ClipGuide.from_pretrained(str(config_path), pretrained=str(safetensors_path)),
    ]
    for other in loaded:
        assert_same_outputs(guide, other, frames)
    assert loaded[1].identity == guide.identity  # same label, config and weights
    assert offline == []


def test_registry_name_with_a_local_checkpoint(guide, frames, tmp_path, offline) -> None:
    """A config registered with open_clip loads by name, weights from a file (create_model path)."""
    import open_clip

    name = "freevllm-test-tiny-guide"
    (tmp_path / f"{name}.json").write_text(json.dumps(guide.model_config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    assert name in available_models()
    checkpoint = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in guide.model.state_dict().items()}, checkpoint)
    loaded = ClipGuide.from_pretrained(name, pretrained=checkpoint)
    assert loaded.identity.startswith(f"{name}@")
    assert_same_outputs(guide, loaded, frames)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="could not load CLIP model .*corrupt.pt"):
        ClipGuide.from_pretrained(name, pretrained=corrupt)
    assert offline == []


def test_registry_tag_uses_the_tags_quick_gelu_and_names_the_tag(
    guide, frames, tmp_path, offline, monkeypatch
) -> None:
    """OpenAI tags were trained with QuickGELU; the architecture config alone says GELU.

    A tag is registered for a tiny architecture, its weights given as a local ``file`` (open_clip's
    own field for that), so the tag path runs offline exactly as for ``ViT-L-14-336/openai``.
    """
    import open_clip
    from open_clip.transformer import QuickGELU

    name = "freevllm-test-tiny-tagged"
    (tmp_path / f"{name}.json").write_text(json.dumps(guide.model_config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    checkpoint = guide.save_pretrained(tmp_path / "tiny") / "open_clip_model.safetensors"
    tag_cfg = {
        "file": str(checkpoint),
        "quick_gelu": True,
        "mean": open_clip.OPENAI_DATASET_MEAN,
        "std": open_clip.OPENAI_DATASET_STD,
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {"openai_like": tag_cfg})

    tagged = ClipGuide.from_pretrained(name, "OpenAI-like")
    assert tagged.identity == f"{name}:openai_like"
    assert tagged.model_config["quick_gelu"] is True
    assert isinstance(tagged.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    quick = ClipGuide.from_config({**guide.model_config, "quick_gelu": True}, checkpoint)
    assert_same_outputs(tagged, quick, frames)
    plain = guide.encode_frames(frames).pooled  # same weights with GELU: other features
    assert not torch.allclose(tagged.encode_frames(frames).pooled, plain, atol=1e-4)
    assert offline == []


def test_available_weights_come_from_open_clips_registry() -> None:
    assert ("ViT-L-14-336", "openai") in available_weights("ViT-L-14-336")
    assert "ViT-L-14-336" in available_models()


# -- errors -----------------------------------------------------------------------------------


def test_unknown_model_name(offline) -> None:
    with pytest.raises(ModelError) as info:
        ClipGuide.from_pretrained("ViT-L-14-337", "openai")
    message = str(info.value)
    assert "ViT-L-14-337" in message
    assert "ViT-L-14-336" in message  # a close match is suggested
    assert "available_models" in message
    assert offline == []


def test_missing_checkpoint(guide, tmp_path, offline) -> None:
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(ModelError, match="nowhere.safetensors") as info:
        ClipGuide.from_pretrained("ViT-B-32", pretrained=missing)
    assert "openai" in str(info.value)  # the known tags are listed
    with pytest.raises(ModelError, match="does not exist"):
        ClipGuide.from_config(guide.model_config, checkpoint=missing)
    with pytest.raises(ModelError, match="does not exist"):
        ClipGuide.from_pretrained(guide.model_config, pretrained=missing)
    with pytest.raises(ModelError, match="pretrained=None"):
        ClipGuide.from_pretrained(guide.model_config)  # a config has no 'openai' tag
    with pytest.raises(ModelError, match="open_clip_config.json"):
        ClipGuide.from_pretrained(tmp_path)  # a directory that is not a saved model
    assert offline == []


def test_uncached_weights_offline_say_how_to_get_them(tmp_path, offline) -> None:
    with pytest.raises(ModelError) as info:
        ClipGuide.from_pretrained("ViT-B-32", "openai", cache_dir=tmp_path / "empty-cache")
    message = str(info.value)
    assert "'ViT-B-32'" in message and "'openai'" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "Download it once with network" in message
    assert "pretrained='/path/to/open_clip_model.safetensors'" in message
    assert "ViT-B-32-quickgelu" in message  # OpenAI weights in a file need the QuickGELU variant
    assert offline == []


def test_checkpoint_for_another_config(guide, tmp_path, offline) -> None:
    checkpoint = guide.save_pretrained(tmp_path / "tiny") / "open_clip_model.safetensors"
    wider = tiny_clip_config(image_size=IMAGE_SIZE, width=64)
    with pytest.raises(ModelError, match="does not load"):
        ClipGuide.from_config(wider, checkpoint=checkpoint)


def test_non_vit_visual_tower() -> None:
    config = tiny_clip_config()
    config["vision_cfg"] = {"layers": [1, 1, 1, 1], "width": 8, "image_size": 64, "head_width": 64}
    with pytest.raises(ModelError, match="ViT") as info:
        ClipGuide.from_config(config)
    assert "ModifiedResNet" in str(info.value)


def test_vocabulary_must_cover_the_tokenizer() -> None:
    with pytest.raises(InputError, match="vocab_size"):
        tiny_clip_config(vocab_size=1000)
    config = tiny_clip_config()
    config["text_cfg"]["vocab_size"] = 1000
    with pytest.raises(ModelError, match="vocab_size"):
        ClipGuide.from_config(config)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 16, 16, 3), dtype=np.float32),  # not uint8
        np.zeros((2, 3, 16, 16), dtype=np.uint8),  # channels first
        np.zeros((16, 16, 3), dtype=np.uint8),  # one frame without T
        [np.zeros((16, 16, 3), dtype=np.uint8)],  # a list
    ],
)
def test_bad_frames_raise_input_error(guide: ClipGuide, bad) -> None:
    with pytest.raises(InputError, match=r"\(T, H, W, 3\)"):
        guide.encode_frames(bad)


def test_bad_arguments_raise_input_error(guide: ClipGuide, frames: np.ndarray) -> None:
    with pytest.raises(InputError, match="batch_size"):
        guide.encode_frames(frames, batch_size=0)
    with pytest.raises(InputError, match="strings"):
        guide.encode_text(["fine", 3])
    with pytest.raises(InputError, match="dtype"):
        tiny_clip_guide(dtype="int8")


def test_bfloat16_still_returns_float32_cpu(guide: ClipGuide, frames: np.ndarray) -> None:
    half = tiny_clip_guide(0, image_size=IMAGE_SIZE, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert half.identity == guide.identity  # the weights, not the precision they run in
    features = half.encode_frames(frames)
    assert features.pooled.dtype == torch.float32 and features.dense.dtype == torch.float32
    reference = guide.encode_frames(frames)
    cosine = (features.pooled * reference.pooled).sum(-1)
    assert bool((cosine > 0.98).all())
