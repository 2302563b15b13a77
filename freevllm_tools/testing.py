"""Tiny models and test media for the project's tests and for users' own tests.

Everything here runs offline in seconds on a CPU: random-weight models built from configs,
and videos written with PyAV. Nothing here downloads anything.
"""

from __future__ import annotations
