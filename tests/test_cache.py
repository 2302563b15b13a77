"""FeatureCache: key rules (content hash remembered by path/size/mtime), entries, LRU budget."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from freevllm_tools import cache as cache_module
from freevllm_tools.cache import (
    GUIDE_DENSE,
    GUIDE_POOLED,
    LLM_TOKENS,
    FeatureCache,
    feature_name,
    hash_file,
    parse_bytes,
)
from freevllm_tools.errors import InputError, VideoError


@pytest.fixture
def counted_hashes(monkeypatch):
    """Count every file the cache reads to hash."""
    calls: list[str] = []

    def counting(path, **kwargs):
        calls.append(os.fspath(path))
        return hash_file(path, **kwargs)

    monkeypatch.setattr(cache_module, "hash_file", counting)
    return calls


@pytest.fixture
def video_file(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # spans several hash chunks
    return path


def test_feature_name_sorts_settings_and_separates_models():
    name = feature_name(GUIDE_POOLED, "ViT-L-14-336:openai", frames=50, dtype="float32")
    assert name == "guide-pooled|ViT-L-14-336:openai|dtype=float32,frames=50"
    assert name == feature_name(GUIDE_POOLED, "ViT-L-14-336:openai", dtype="float32", frames=50.0)
    assert name != feature_name(GUIDE_POOLED, "tiny-clip@abc", frames=50, dtype="float32")
    assert name != feature_name(GUIDE_POOLED, "ViT-L-14-336:openai", frames=32, dtype="float32")
    assert feature_name(LLM_TOKENS, "m", grid=(24, 24)) == "llm-tokens|m|grid=24x24"
    with pytest.raises(InputError):
        feature_name("a|b", "m")
    with pytest.raises(InputError):
        feature_name(GUIDE_POOLED, "")


def test_hash_file_is_the_whole_file_content(video_file):
    import hashlib

    expected = hashlib.blake2b(video_file.read_bytes(), digest_size=20).hexdigest()
    assert hash_file(video_file) == expected
    assert hash_file(video_file, chunk_size=1000) == expected


def test_unchanged_file_is_hashed_once_even_by_a_new_cache_object(tmp_path, video_file, counted_hashes):
    cache = FeatureCache(tmp_path / "cache")
    first = cache.video_key(video_file)
    assert cache.video_key(video_file) == first
    assert cache.video_key(str(video_file)) == first
    assert len(counted_hashes) == 1
    assert (cache.stats.hashes, cache.stats.key_reuses) == (1, 2)
    # Another process (another object on the same folder) remembers it too.
    again = FeatureCache(tmp_path / "cache")
    assert again.video_key(video_file) == first
    assert len(counted_hashes) == 1


def test_renamed_copy_hits_and_edited_file_misses(tmp_path, video_file, counted_hashes):
    cache = FeatureCache(tmp_path / "cache")
    key = cache.video_key(video_file)
    copy = tmp_path / "renamed copy.mp4"
    shutil.copy(video_file, copy)
    assert cache.video_key(copy) == key  # same content, other name: same key
    link = tmp_path / "link.mp4"
    link.symlink_to(video_file)
    assert cache.video_key(link) == key
    assert len(counted_hashes) == 2  # the copy was read once; the symlink resolves to the original

    data = bytearray(video_file.read_bytes())
    data[1000] ^= 0xFF  # same size, one byte different
    video_file.write_bytes(bytes(data))
    st = video_file.stat()
    os.utime(video_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    edited = cache.video_key(video_file)
    assert edited != key
    assert len(counted_hashes) == 3
    assert cache.video_key(copy) == key


def test_video_key_errors_name_the_path(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(VideoError, match="does not exist"):
        cache.video_key(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="not a regular file"):
        cache.video_key(tmp_path)


def test_round_trip_numpy_and_torch_dtypes(tmp_path):
    torch = pytest.importorskip("torch")
    cache = FeatureCache(tmp_path / "cache")
    name = feature_name(GUIDE_POOLED, "guide", frames=4)
    bf16 = torch.randn(4, 3, dtype=torch.bfloat16)
    half = torch.randn(2, 2, dtype=torch.float16)
    indices = np.array([0, 3, 6, 9], dtype=np.int64)
    meta = {"info": {"fps": Fraction(30000, 1001), "path": Path("/v.mp4")}, "partial": False}
    assert cache.put("k" * 40, name, {"pooled": bf16, "half": half, "indices": indices}, meta=meta)
    entry = cache.get("k" * 40, name)
    assert entry is not None and entry.persistent  # guide-pooled is persistent by kind
    assert sorted(entry.names) == ["half", "indices", "pooled"]
    assert entry.tensor("pooled").dtype == torch.bfloat16
    assert torch.equal(entry.tensor("pooled"), bf16)  # bit-exact
    assert entry["pooled"].dtype == np.float32
    np.testing.assert_array_equal(entry["pooled"], bf16.float().numpy())
    assert entry.tensor("half").dtype == torch.float16 and torch.equal(entry.tensor("half"), half)
    np.testing.assert_array_equal(entry["indices"], indices)
    assert entry.meta == {"info": {"fps": "30000/1001", "path": "/v.mp4"}, "partial": False}
    tensors = cache.get_tensors("k" * 40, name)
    assert set(tensors) == {"pooled", "half", "indices"}


def test_no_pickles_stored_or_loaded(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(InputError, match="no pickling"):
        cache.put("k" * 40, feature_name(GUIDE_DENSE, "g"), {"x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(InputError):
        cache.put("k" * 40, feature_name(GUIDE_DENSE, "g"), {"../escape": np.zeros(2)})
    name = feature_name(GUIDE_DENSE, "g")
    cache.put("k" * 40, name, {"x": np.zeros(3)})
    # A blob replaced by a pickled object array is refused on load, and counts as a miss.
    blob = next((tmp_path / "cache" / "blobs").rglob("*.x.npy"))
    np.save(blob, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    assert cache.get("k" * 40, name) is None
    assert cache.stats.misses == 1
    assert not cache.contains("k" * 40, name)  # the damaged entry is dropped


def test_other_model_or_sampling_misses(tmp_path, video_file):
    cache = FeatureCache(tmp_path / "cache")
    key = cache.video_key(video_file)
    cache.put(key, feature_name(GUIDE_POOLED, "clip-a", frames=50), {"pooled": np.ones((50, 8), np.float32)})
    assert cache.get(key, feature_name(GUIDE_POOLED, "clip-a", frames=50)) is not None
    assert cache.get(key, feature_name(GUIDE_POOLED, "clip-b", frames=50)) is None
    assert cache.get(key, feature_name(GUIDE_POOLED, "clip-a", frames=32)) is None
    assert cache.get("0" * 40, feature_name(GUIDE_POOLED, "clip-a", frames=50)) is None
    assert (cache.stats.hits, cache.stats.misses) == (1, 3)


def test_lru_eviction_under_a_tiny_budget(tmp_path):
    entry_bytes = 100 * 4
    cache = FeatureCache(tmp_path / "cache", budget_bytes=3 * entry_bytes)
    names = [feature_name(LLM_TOKENS, "llm", video=i) for i in range(4)]
    for i, name in enumerate(names[:3]):
        assert cache.put("k" * 40, name, {"tokens": np.full(100, i, np.float32)})
    assert cache.get("k" * 40, names[0]) is not None  # A is now more recent than B and C
    assert cache.put("k" * 40, names[3], {"tokens": np.zeros(100, np.float32)})
    assert cache.stats.evictions == 1
    assert not cache.contains("k" * 40, names[1])  # B, the least recently used, went
    for name in (names[0], names[2], names[3]):
        assert cache.contains("k" * 40, name)
    assert [e.name for e in cache.entries()] == [names[2], names[0], names[3]]  # LRU first
    assert cache.usage().budgeted_bytes == 3 * entry_bytes
    # B's file went with it; three entries' files remain.
    assert len(list((tmp_path / "cache" / "blobs").rglob("*.npy"))) == 3
    # Touching C then adding two more evicts A and D, in that order.
    cache.get("k" * 40, names[2])
    cache.put("k" * 40, feature_name(LLM_TOKENS, "llm", video=4), {"tokens": np.zeros(100, np.float32)})
    cache.put("k" * 40, feature_name(LLM_TOKENS, "llm", video=5), {"tokens": np.zeros(100, np.float32)})
    assert not cache.contains("k" * 40, names[0]) and not cache.contains("k" * 40, names[3])
    assert cache.contains("k" * 40, names[2])
    assert cache.stats.evictions == 3


def test_persistent_entries_are_never_evicted_nor_counted(tmp_path):
    cache = FeatureCache(tmp_path / "cache", budget_bytes=1000)
    pooled = feature_name(GUIDE_POOLED, "clip", frames=50)
    assert cache.put("p" * 40, pooled, {"pooled": np.zeros(5000, np.float32)})  # 20 kB > budget
    dense = feature_name(GUIDE_DENSE, "clip", frames=50)
    assert cache.put("p" * 40, dense, {"x": np.zeros(2000, np.float32)}, persistent=True)
    for i in range(10):
        cache.put(f"{i:040d}", feature_name(LLM_TOKENS, "m"), {"t": np.zeros(200, np.float32)})
    assert cache.contains("p" * 40, pooled) and cache.contains("p" * 40, dense)
    usage = cache.usage()
    assert usage.persistent_bytes == 20000 + 8000
    assert usage.budgeted_bytes <= 1000
    assert cache.stats.evictions == 9
    assert cache.evict(0) == 1  # explicit eviction empties the budgeted class only
    assert cache.contains("p" * 40, pooled)


def test_entry_larger_than_the_budget_is_not_stored(tmp_path):
    cache = FeatureCache(tmp_path / "cache", budget_bytes="1KB")
    small = feature_name(LLM_TOKENS, "m", n=1)
    cache.put("k" * 40, small, {"t": np.zeros(10, np.float32)})
    assert not cache.put("k" * 40, feature_name(LLM_TOKENS, "m", n=2), {"t": np.zeros(1000, np.float32)})
    assert cache.contains("k" * 40, small)  # nothing was evicted for it
    assert cache.stats.evictions == 0


def test_replacing_an_entry_removes_the_old_files(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    name = feature_name(GUIDE_DENSE, "g")
    cache.put("k" * 40, name, {"x": np.zeros(3)})
    cache.put("k" * 40, name, {"x": np.ones(3)})
    np.testing.assert_array_equal(cache.get("k" * 40, name)["x"], np.ones(3))
    assert len(list((tmp_path / "cache" / "blobs").rglob("*.npy"))) == 1
    assert cache.delete("k" * 40) == 1
    assert not list((tmp_path / "cache" / "blobs").rglob("*.npy"))


def test_location_from_argument_environment_or_platform(tmp_path, monkeypatch):
    monkeypatch.setenv("FREEVLLM_CACHE", str(tmp_path / "from-env"))
    monkeypatch.setenv("FREEVLLM_CACHE_BUDGET", "2MiB")
    from_env = FeatureCache()
    assert from_env.root == tmp_path / "from-env" and (tmp_path / "from-env" / "cache.sqlite").exists()
    assert from_env.budget_bytes == 2 * 1024**2
    explicit = FeatureCache(tmp_path / "explicit", budget_bytes=123)
    assert explicit.root == tmp_path / "explicit" and explicit.budget_bytes == 123
    monkeypatch.delenv("FREEVLLM_CACHE")
    import platformdirs

    assert cache_module.default_cache_dir() == Path(platformdirs.user_cache_dir("freevllm"))


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 * 1024**3
    assert parse_bytes("500 MB") == 500_000_000
    assert parse_bytes(1234) == 1234
    for bad in ("lots", "-1GB", True):
        with pytest.raises(InputError):
            parse_bytes(bad)


def test_sweep_removes_orphans_of_killed_writers(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    name = feature_name(GUIDE_DENSE, "g")
    cache.put("k" * 40, name, {"x": np.zeros(3)})
    folder = next((tmp_path / "cache" / "blobs").rglob("*.npy")).parent
    orphan = folder / "deadbeef.x.npy"  # written, never published by a transaction
    np.save(orphan, np.zeros(3))
    tmp = folder / ".tmp-123-abc.x.npy"
    tmp.write_bytes(b"half")
    assert cache.sweep(min_age_s=3600) == 0  # too young: might belong to a live writer
    assert cache.sweep(min_age_s=0) == 2
    assert not orphan.exists() and not tmp.exists()
    assert cache.get("k" * 40, name) is not None


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from freevllm_tools.cache import FeatureCache, feature_name
    root, worker = sys.argv[1], int(sys.argv[2])
    cache = FeatureCache(root, budget_bytes=10 * 400)
    for i in range(30):
        name = feature_name("llm-tokens", "m", worker=worker, i=i)
        cache.put(f"{worker:040d}", name, {"tokens": np.full(100, i, np.float32)})
        got = cache.get(f"{(1 - worker):040d}", feature_name("llm-tokens", "m", worker=1 - worker, i=i))
        if got is not None:
            assert got["tokens"].shape == (100,)
    print(cache.stats.evictions)
    """
)


def test_two_processes_share_one_cache(tmp_path):
    root = tmp_path / "cache"
    FeatureCache(root)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(w)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in (0, 1)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    cache = FeatureCache(root, budget_bytes=10 * 400)
    entries = cache.entries()
    assert len(entries) == 10 and cache.usage().budgeted_bytes == 10 * 400
    assert sum(int(out) for out, _ in outputs) == 60 - 10  # every eviction done exactly once
    for info in entries:  # every published entry is complete on disk
        assert cache.get(info.video_key, info.name) is not None
    assert len(list((root / "blobs").rglob("*.npy"))) == 10


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_cache_database_is_set_aside_and_the_cache_works(tmp_path, damage):
    root = tmp_path / "cache"
    cache = FeatureCache(root)
    key = "0" * 40
    for i in range(30):
        cache.put(key, feature_name("guide-dense", "m", frames=i), {"x": np.ones((64, 64), np.float32)})
    cache.close()
    db = root / "cache.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    data = db.read_bytes()
    db.write_bytes(os.urandom(len(data)) if damage == "garbage" else data[: len(data) // 3])
    reopened = FeatureCache(root)
    name = feature_name("guide-dense", "m", frames=1)
    assert "damaged" in reopened.repairs[0]
    assert list(root.glob("cache.sqlite.damaged-*"))
    assert reopened.get(key, name) is None  # an empty, working cache
    reopened.put(key, name, {"x": np.zeros(3, np.float32)})
    assert reopened.get(key, name).array("x").tolist() == [0.0, 0.0, 0.0]
