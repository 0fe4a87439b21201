"""Which heads the engine tests run: one rule for every test module (and its subprocesses)."""

from __future__ import annotations

import os
from pathlib import Path


def heads_under_test(tmp: Path, num_depths: int) -> str:
    """``$BEBOP_TEST_HEADS`` if set, else the shipped heads if present, else random heads in ``tmp``."""
    from bebop_vllm.paths import SHIPPED_HEADS_DIR, default_model_dir

    if os.environ.get("BEBOP_TEST_HEADS"):
        return os.environ["BEBOP_TEST_HEADS"]
    if (SHIPPED_HEADS_DIR / "model.safetensors").is_file():
        return str(SHIPPED_HEADS_DIR)
    from bebop_vllm.heads import init_random_heads

    return str(init_random_heads(default_model_dir(), tmp / "heads", num_depths=num_depths, seed=0))
