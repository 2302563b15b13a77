"""A second question about a seen video decodes nothing and runs no encoder (DESIGN.md §3)."""

from __future__ import annotations

import shutil

import pytest
import torch

import freevllm_tools.video as video_module
from freevllm_tools.cache import FeatureCache
from freevllm_tools.pipeline import FreeVideoLLM
from freevllm_tools.testing import tiny_clip_guide, tiny_llava_next, write_video


class Counter:
    """Counts decodes and encoder passes by wrapping them."""

    def __init__(self, monkeypatch, qa: FreeVideoLLM) -> None:
        self.calls = {"decode": 0, "guide": 0, "vision": 0}
        read_frames = video_module.read_frames

        def decode(*args, **kwargs):
            self.calls["decode"] += 1
            return read_frames(*args, **kwargs)

        monkeypatch.setattr(video_module, "read_frames", decode)
        for name, owner in (("guide", qa.guide), ("vision", qa.answerer)):
            monkeypatch.setattr(owner, "encode_frames", self._wrap(name, owner.encode_frames))

    def _wrap(self, name, encode):
        def wrapper(frames, **kwargs):
            self.calls[name] += 1
            return encode(frames, **kwargs)

        return wrapper

    def take(self) -> dict[str, int]:
        calls, self.calls = self.calls, {k: 0 for k in self.calls}
        return calls


NOTHING = {"decode": 0, "guide": 0, "vision": 0}
EVERYTHING = {"decode": 1, "guide": 1, "vision": 1}


@pytest.fixture()
def parts():
    return tiny_clip_guide(0), tiny_llava_next(0, max_position_embeddings=2048)


def make_qa(parts, cache_dir, **cache_kwargs) -> FreeVideoLLM:
    guide, answerer = parts
    return FreeVideoLLM(guide, answerer, cache=FeatureCache(cache_dir, **cache_kwargs), max_new_tokens=5)


def test_second_question_is_a_full_hit(parts, tmp_path, monkeypatch):
    video = write_video(tmp_path / "a.mp4", num_frames=40)
    qa = make_qa(parts, tmp_path / "cache")
    counter = Counter(monkeypatch, qa)
    cold = qa.ask(video, "What happens at the end?")
    assert counter.take() == EVERYTHING and cold.cache_hit is False

    same = qa.ask(video, "What happens at the end?")
    assert counter.take() == NOTHING and same.cache_hit is True
    assert same.answer == cold.answer
    assert same.pathways == cold.pathways
    assert "decode" not in same.timings and same.timings["cache"] > 0

    other = qa.ask(video, "Is there a red square?")
    assert counter.take() == NOTHING and other.cache_hit is True


def test_hits_survive_a_new_process_view_of_the_cache(parts, tmp_path, monkeypatch):
    video = write_video(tmp_path / "a.mp4", num_frames=20)
    cold = make_qa(parts, tmp_path / "cache").ask(video, "What is moving?")
    qa = make_qa(parts, tmp_path / "cache")  # a fresh FeatureCache object on the same folder
    counter = Counter(monkeypatch, qa)
    warm = qa.ask(video, "What is moving?")
    assert counter.take() == NOTHING and warm.answer == cold.answer


def test_renamed_copy_hits_and_edited_file_misses(parts, tmp_path, monkeypatch):
    video = write_video(tmp_path / "a.mp4", num_frames=20)
    qa = make_qa(parts, tmp_path / "cache")
    counter = Counter(monkeypatch, qa)
    qa.ask(video, "What is moving?")
    counter.take()

    copy = tmp_path / "renamed.mp4"
    shutil.copy(video, copy)
    result = qa.ask(copy, "What is moving?")
    assert counter.take() == NOTHING and result.cache_hit
    assert result.video == str(copy.resolve())  # the copy's own path, not the cached one

    write_video(video, num_frames=20, seed=7)  # same name, new content
    result = qa.ask(video, "What is moving?")
    assert counter.take() == EVERYTHING and not result.cache_hit


def test_other_models_miss_only_their_own_features(parts, tmp_path, monkeypatch):
    video = write_video(tmp_path / "a.mp4", num_frames=20)
    make_qa(parts, tmp_path / "cache").ask(video, "What is moving?")

    # Another language model: its tokens miss, the guide's features and the frames hit.
    guide, _ = parts
    qa = FreeVideoLLM(
        guide, tiny_llava_next(1, max_position_embeddings=2048), cache=FeatureCache(tmp_path / "cache")
    )
    counter = Counter(monkeypatch, qa)
    result = qa.ask(video, "What is moving?", max_new_tokens=3)
    assert counter.take() == {"decode": 0, "guide": 0, "vision": 1} and not result.cache_hit
    qa.ask(video, "What is moving?", max_new_tokens=3)
    assert counter.take() == NOTHING


def test_tokens_from_cached_frames_equal_tokens_from_a_decode(parts, tmp_path):
    video = write_video(tmp_path / "a.mp4", num_frames=20, size=(80, 60))
    qa = make_qa(parts, tmp_path / "cache")
    cold = qa.features(video)
    names = qa._cache_names()
    key = qa.cache.video_key(video)
    qa.cache.delete(key, names["tokens"])
    rebuilt = qa.features(video)
    assert torch.equal(rebuilt.frame_tokens, cold.frame_tokens)
    assert torch.equal(rebuilt.guide_pooled, cold.guide_pooled)


def test_tiny_budget_evicts_but_answers_stay_the_same(parts, tmp_path, monkeypatch):
    first = write_video(tmp_path / "a.mp4", num_frames=20)
    second = write_video(tmp_path / "b.mp4", num_frames=20, seed=3)
    # Room for one video's budgeted entries at most: the second evicts the first's.
    qa = make_qa(parts, tmp_path / "cache", budget_bytes=200_000)
    cold = qa.ask(first, "What is moving?")
    qa.ask(second, "What is moving?")
    assert qa.cache.stats.evictions > 0
    counter = Counter(monkeypatch, qa)
    again = qa.ask(first, "What is moving?")
    calls = counter.take()
    assert calls["guide"] + calls["vision"] >= 1  # something had to be recomputed
    assert again.answer == cold.answer
    # The pooled guide embeddings are persistent: never evicted.
    key = qa.cache.video_key(first)
    assert qa.cache.get(key, qa._cache_names()["pooled"]) is not None
