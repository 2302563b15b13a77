"""The project's exceptions: one base class, one subclass per family.

Every message names the input, the cause and, where there is one, the fix, so that a
user (or an agent reading a tool error) can act on it without reading a traceback.
"""

from __future__ import annotations

__all__ = [
    "FreeVideoError",
    "ConfigError",
    "VideoError",
    "ModelError",
    "InputError",
    "AccessError",
    "LibraryError",
]


class FreeVideoError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FreeVideoError, ValueError):
    """An invalid perception configuration, preset name or reference string."""


class VideoError(FreeVideoError):
    """A video that cannot be opened, probed or decoded (or breaks a limit)."""


class ModelError(FreeVideoError):
    """A model that cannot be loaded, or whose outputs do not fit the plan."""


class InputError(FreeVideoError, ValueError):
    """A bad argument from a caller: an empty or over-long question, a bad ``k``."""


class AccessError(FreeVideoError, PermissionError):
    """A path outside the allowed roots, a device file, a URL: refused before opening."""


class LibraryError(FreeVideoError):
    """A video library or feature cache that cannot be opened, read or written."""
