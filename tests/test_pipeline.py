"""FreeVideoLLM end to end on tiny random models: the plan reaches the LLM, exactly."""

from __future__ import annotations

import asyncio

import pytest
import torch

import freevllm_tools.video as video_module
from freevllm_tools import InputError, PerceptionConfig, VideoError, perception
from freevllm_tools.testing import tiny_free_video_llm, write_video

QUESTION = "What happens at the end of the clip?"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("videos") / "clip.mp4", num_frames=72, size=(64, 48))


@pytest.fixture(scope="module", params=["llava_next", "llava_onevision"])
def qa(request):
    return tiny_free_video_llm(family=request.param, max_new_tokens=6)


def test_language_model_receives_exactly_the_planned_tokens(qa, clip):
    features = qa.features(clip)
    plan = qa.plan(features, QUESTION)
    planned = perception.gather(plan, features.frame_tokens)
    captured = []

    def hook(module, args, kwargs):
        captured.append(kwargs["inputs_embeds"].detach().clone())

    handle = qa.answerer.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = qa.ask(clip, QUESTION)
    finally:
        handle.remove()

    prefill = captured[0][0]
    ids = qa.answerer.tokenize_prompt(QUESTION, features.timing(plan))
    position = int((ids == qa.answerer.image_token_id).nonzero()[0])
    assert planned.shape[0] == result.num_visual_tokens
    assert prefill.shape[0] == len(ids) - 1 + result.num_visual_tokens
    assert torch.equal(prefill[position : position + planned.shape[0]], planned)


def test_prompt_tells_when_the_slow_frames_were_taken(qa, clip, tmp_path):
    features = qa.features(clip)
    assert features.duration == pytest.approx(72 * 1001 / 30000)  # 72 frames at 29.97 fps
    plan = qa.plan(features, QUESTION)
    slow = [f"{features.timestamps[i]:.1f}" for i in plan.pathways["slow"].frames]
    expected = f"The video lasts 2.4 seconds; its key frames are at {slow[0]}, {slow[1]} and {slow[2]} seconds."
    assert features.timing(plan) == expected
    prompts = []
    build = qa.answerer.build_prompt
    qa.answerer.build_prompt = lambda question, context=None: prompts.append(context) or build(question, context)
    try:
        qa.ask(clip, QUESTION)
        "".join(qa.stream(clip, QUESTION))
    finally:
        del qa.answerer.build_prompt
    assert prompts == [expected, expected]
    cached = tiny_free_video_llm(cache_dir=tmp_path / "cache", max_new_tokens=2)
    cold, warm = cached.features(clip), cached.features(clip)
    assert warm.cache_hit and cold.duration == warm.duration == features.duration


def test_provenance_matches_the_plan(qa, clip):
    result = qa.ask(clip, QUESTION)
    grid = qa.answerer.grid_size
    assert result.num_visual_tokens == PerceptionConfig.paper().num_visual_tokens(grid, 50)
    assert sum(p.num_tokens for p in result.pathways.values()) == result.num_visual_tokens
    assert list(result.pathways) == ["slow", "middle", "fast"]
    slow, middle, fast = (result.pathways[k] for k in ("slow", "middle", "fast"))
    assert len(slow.frame_indices) == 3 and len(middle.frame_indices) == 5 and len(fast.frame_indices) == 50
    assert slow.frame_indices == sorted(slow.frame_indices)
    # Middle frames are sampled positions 0, 10, 20, 30, 40 of the segment-middle rule.
    from freevllm_tools.config import sample_frame_indices

    sampled = sample_frame_indices(72, 50)
    assert middle.frame_indices == [sampled[i] for i in (0, 10, 20, 30, 40)]
    # Timestamps are the frames' presentation times (30000/1001 fps).
    for index, t in zip(middle.frame_indices, middle.timestamps):
        assert t == pytest.approx(index * 1001 / 30000, abs=1e-3)
    width, height = result.frame_size
    assert (width, height) == (64, 48)
    for box, box_px in zip(slow.boxes, slow.boxes_px):
        top, left, bottom, right = box
        x0, y0, x1, y1 = box_px
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (bottom - top) * (right - left) * 3 == slow.num_tokens
    assert all(b is None for b in fast.boxes)
    assert set(result.models) == {"guide", "llm"}
    assert result.cache_hit is False
    data = result.to_dict()
    assert data["pathways"]["slow"]["frame_indices"] == slow.frame_indices


def test_answer_text_and_timings(qa, clip):
    result = qa.ask(clip, QUESTION)
    assert isinstance(result.answer, str) and result.answer.startswith("In the video,")
    for stage in ("decode", "guide", "vision", "perception", "prefill", "generate", "total"):
        assert result.timings[stage] > 0, stage
    assert result.timings["total"] >= result.timings["decode"] + result.timings["prefill"]
    assert "slow frames at" in result.grounding()


def test_stream_joins_to_the_same_text_as_ask(qa, clip):
    pieces = list(qa.stream(clip, QUESTION))
    assert len(pieces) >= 1
    assert "".join(pieces) == qa.ask(clip, QUESTION).answer
    streamed = []
    result = qa.ask(clip, QUESTION, on_text=streamed.append)
    assert "".join(streamed) == result.answer
    assert result.timings["prefill"] > 0


def test_aask_gives_the_same_answer(qa, clip):
    result = asyncio.run(qa.aask(clip, QUESTION))
    assert result.answer == qa.ask(clip, QUESTION).answer


def test_decoded_once_and_each_encoder_once_per_frame(qa, clip, monkeypatch):
    calls = {"decode": 0, "guide": 0, "vision": 0}
    frames_seen = {"guide": 0, "vision": 0}
    read_frames = video_module.read_frames
    guide_encode = qa.guide.encode_frames
    vision_encode = qa.answerer.encode_frames

    def counting_read(*args, **kwargs):
        calls["decode"] += 1
        return read_frames(*args, **kwargs)

    def counting(name, encode):
        def wrapper(frames, **kwargs):
            calls[name] += 1
            frames_seen[name] += len(frames)
            return encode(frames, **kwargs)

        return wrapper

    monkeypatch.setattr(video_module, "read_frames", counting_read)
    monkeypatch.setattr(qa.guide, "encode_frames", counting("guide", guide_encode))
    monkeypatch.setattr(qa.answerer, "encode_frames", counting("vision", vision_encode))
    qa.ask(clip, QUESTION)
    assert calls == {"decode": 1, "guide": 1, "vision": 1}
    assert frames_seen == {"guide": 50, "vision": 50}


def test_short_video_gives_what_the_rules_give(qa, tmp_path):
    short = write_video(tmp_path / "short.mp4", num_frames=3)
    result = qa.ask(short, QUESTION)
    grid = qa.answerer.grid_size
    assert result.num_visual_tokens == PerceptionConfig.paper().num_visual_tokens(grid, 3)
    assert result.pathways["middle"].frame_indices == [0, 1, 2]


def test_bad_inputs_raise_the_projects_errors(qa, clip, tmp_path):
    with pytest.raises(VideoError, match="missing.mp4"):
        qa.ask(tmp_path / "missing.mp4", QUESTION)
    with pytest.raises(InputError, match="empty"):
        qa.ask(clip, "   ")
    with pytest.raises(InputError, match="characters"):
        qa.ask(clip, "why? " * 1000)
    with pytest.raises(InputError, match="string"):
        qa.ask(clip, None)  # type: ignore[arg-type]


def test_reference_string_preset(clip):
    qa = tiny_free_video_llm(
        config="slow_2frms_spatial_1d_max_pool_roi10-middle_0frms_spatial_1d_max_pool_24x12-fast_10frms_2x2"
    )
    result = qa.ask(clip, QUESTION)
    h, w = qa.answerer.grid_size
    assert result.num_visual_tokens == 2 * h * -(-w // 2) + 10 * 4
    assert len(result.pathways["fast"].frame_indices) == 10
