"""benchmarks/record_engine_metrics.py: a throughput result's batch-1 numbers land in bebop.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from record_engine_metrics import main, record  # noqa: E402

from bebop_vllm.errors import BebopError  # noqa: E402
from bebop_vllm.heads.metadata import read_metadata  # noqa: E402
from bebop_vllm.paths import SHIPPED_HEADS_DIR  # noqa: E402


def _heads_without_engine_numbers(tmp_path: Path) -> Path:
    """A heads folder whose bebop.json is the shipped one without its ``engine`` field."""
    heads = tmp_path / "heads"
    heads.mkdir()
    meta = json.loads((SHIPPED_HEADS_DIR / "bebop.json").read_text())
    meta.pop("engine", None)
    (heads / "bebop.json").write_text(json.dumps(meta))
    return heads


def _cell(t: float, batch: int, domain: str, fixed_len: float) -> dict:
    return {"temperature": t, "batch": batch, "domain": domain, "num_prompts": 4,
            "engines": {"none": {"tok_s": 30.0, "mean_accepted_len": None, "ratio": 1.0},
                        "bebop": {"tok_s": 36.0, "mean_accepted_len": fixed_len, "ratio": 1.2}}}


def _result(heads: Path) -> dict:
    return {"command": "python benchmarks/bench_throughput.py --heads X", "machine": "test CPU; flags avx2",
            "config": {"heads": str(heads), "k": 3},
            "cells": [_cell(1.0, 1, "math", 1.75), _cell(1.0, 1, "code", 1.95), _cell(0.0, 1, "math", 2.5),
                      _cell(1.0, 16, "math", 9.9)],
            "summary": {"1.0|1": {"bebop": 1.2, "bebop@old": 1.1}, "1.0|16": {"bebop": 0.8}, "0.0|1": {"bebop": 1.4}}}


def test_record_writes_batch1_numbers_into_the_heads_metadata(tmp_path: Path) -> None:
    heads = _heads_without_engine_numbers(tmp_path)
    before = read_metadata(heads)
    bench = tmp_path / "throughput.json"
    bench.write_text(json.dumps(_result(heads)))
    assert main(["--throughput", str(bench)]) == 0
    meta = read_metadata(heads)
    assert meta.engine is not None and meta.engine.k == 3
    assert meta.engine.tokens_per_verify_step == {"1.0": {"math": 1.75, "code": 1.95}, "0.0": {"math": 2.5}}
    # batch 16 and the engines of other heads (bebop@old: --alt-heads) left out
    assert meta.engine.speedup_vs_plain == {"1.0": {"bebop": 1.2}, "0.0": {"bebop": 1.4}}
    assert meta.heldout == before.heldout and meta.train_steps == before.train_steps  # the rest is kept


def test_record_refuses_a_benchmark_of_other_heads_or_without_batch1(tmp_path: Path) -> None:
    heads = _heads_without_engine_numbers(tmp_path)
    bench = tmp_path / "throughput.json"
    bench.write_text(json.dumps(_result(tmp_path / "other")))
    with pytest.raises(BebopError, match="measured"):
        record(bench, heads)
    res = _result(heads)
    res["cells"] = [c for c in res["cells"] if c["batch"] != 1]
    bench.write_text(json.dumps(res))
    before = (heads / "bebop.json").read_text()
    with pytest.raises(BebopError, match="batch-1"):
        record(bench, heads)
    assert (heads / "bebop.json").read_text() == before and read_metadata(heads).engine is None  # nothing written
