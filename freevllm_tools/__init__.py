"""freevllm-tools: Free Video-LLM question answering and retrieval for LangChain and LlamaIndex.

Data flows one way: video -> frames -> features (cached) -> perception plan -> answer.
Heavy modules (torch, transformers, FAISS) load lazily, so ``import freevllm_tools`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import Pathway, PerceptionConfig
from .errors import (
    AccessError,
    ConfigError,
    FreeVideoError,
    InputError,
    LibraryError,
    ModelError,
    VideoError,
)
from .limits import Limits

__version__ = "0.1.0"

_LAZY = {
    "ClipGuide": "guide",
    "GuideFeatures": "guide",
    "Frames": "video",
    "VideoInfo": "video",
    "probe": "video",
    "read_frames": "video",
    "Perception": "perception",
    "perceive": "perception",
    "FreeVideoLLM": "pipeline",
    "AskResult": "pipeline",
    "LlavaAnswerer": "answerer",
    "Generation": "answerer",
    "VideoLibrary": "library",
    "Moment": "library",
    "FeatureCache": "cache",
}

if TYPE_CHECKING:  # pragma: no cover
    from .answerer import Generation, LlavaAnswerer
    from .cache import FeatureCache
    from .guide import ClipGuide, GuideFeatures
    from .library import Moment, VideoLibrary
    from .perception import Perception, perceive
    from .pipeline import AskResult, FreeVideoLLM
    from .video import Frames, VideoInfo, probe, read_frames


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'freevllm_tools' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "__version__",
    "AccessError",
    "ConfigError",
    "FreeVideoError",
    "InputError",
    "LibraryError",
    "ModelError",
    "VideoError",
    "Limits",
    "Pathway",
    "PerceptionConfig",
    *_LAZY,
]
