"""Measured speed of freevllm-tools: ``python -m benchmarks.run`` (``make bench``).

Figures go to ``docs/benchmarks.md`` and ``docs/benchmarks.json``; tests never assert a time
(DESIGN.md §4), they only check that the harness runs and reports (``tests/test_benchmarks.py``).
"""
