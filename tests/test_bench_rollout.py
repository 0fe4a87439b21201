"""benchmarks/bench_rollout.py: the rollout's tail model (no engine: pure arithmetic on results)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_rollout import concurrency_profile, in_turn, main, tail_model  # noqa: E402


def _cell(c: int, plain_tok_s: float, ratio: float, t: float = 1.0) -> dict:
    return {"temperature": t, "concurrency": c,
            "engines": {"none": {"tok_s": plain_tok_s, "ratio": 1.0}, "bebop-auto": {"tok_s": plain_tok_s * ratio,
                                                                                     "ratio": ratio}}}


def test_concurrency_profile_counts_requests_still_decoding() -> None:
    assert concurrency_profile([3, 1, 3, 0]) == [3, 2, 2]
    assert concurrency_profile([]) == []
    assert sum(concurrency_profile([5, 2, 7, 7])) == 5 + 2 + 7 + 7  # one token per request and step


def test_tail_model_weights_steps_by_their_plain_cost() -> None:
    # 1 request in flight: 10 tok/s (0.1 s per step), 2x with bebop; 4 in flight: 40 tok/s, 1x.
    sweep = [_cell(1, 10.0, 2.0), _cell(4, 40.0, 1.0)]
    # 4 requests for 10 steps (0.1 s each), then 1 request for 10 more steps (0.1 s each).
    tm = tail_model([10, 10, 10, 20], sweep, 1.0)
    assert tm is not None
    assert tm["plain_decode_s"] == pytest.approx(2.0)
    # Steps at c = 2 and 3 do not occur; the crowd costs 1.0 s either way, the tail 1.0 s -> 0.5 s.
    assert tm["engine_decode_s"] == pytest.approx(1.5)
    assert tm["bound"] == pytest.approx(2.0 / 1.5)
    assert tm["share_c_le_4"] == pytest.approx(1.0)
    # A rollout whose requests all run together to the same length has no tail: the crowd's ratio.
    flat = tail_model([10] * 4, sweep, 1.0)
    assert flat is not None and flat["bound"] == pytest.approx(1.0)


def test_tail_model_interpolates_in_log_concurrency_and_clamps() -> None:
    sweep = [_cell(1, 10.0, 1.5), _cell(4, 40.0, 1.0)]
    two = tail_model([5, 5], sweep, 1.0)  # c = 2: halfway in log2 between 1 and 4
    assert two is not None and two["bound"] == pytest.approx(1.25)
    many = tail_model([5] * 64, sweep, 1.0)  # beyond the sweep: its largest cell
    assert many is not None and many["bound"] == pytest.approx(1.0) and many["sweep_max_concurrency"] == 4
    assert tail_model([5], sweep, 0.7) is None  # no cell at that temperature


def test_in_turn_rotates() -> None:
    assert in_turn(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_sweep_from_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--skip-sweep", "--sweep-from", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r")])
    assert "no such file" in capsys.readouterr().err
