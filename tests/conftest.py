"""Shared fixtures. Video fixtures: the real clips in ``../shared/videos`` (see its README)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """The folder of real test videos; skips the test where it is absent."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"real test videos not found at {SHARED_VIDEOS} (see shared/videos/README.md)")
    return SHARED_VIDEOS
