"""Shared test fixtures and environment for the bebop-vllm suite."""

from __future__ import annotations

import os

# No model or dataset hub is reachable: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "full_power: a statistical test at its full power on a real vocabulary (minutes on 2 cores); "
        "deselected unless -m names full_power, e.g. `pytest -m full_power` (a lower-power version always runs)")


def pytest_collection_modifyitems(config, items) -> None:
    """Deselect the full_power tests unless the -m expression names them: they repeat, with more
    samples, tests that always run (see LARGE_VOCAB_CI_SAMPLES in tests/test_kernels_exactness.py)."""
    if "full_power" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("full_power") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("full_power")])
        items[:] = kept
