"""Any draft-length schedule keeps the sampled distribution exact (one-sample test vs the target).

``scripts/draft_schedule_exactness.py`` replaces the draft-length policy by a random schedule
(plain steps right after drafting steps, drafts cut below the step's K, 0..k per request), samples
``SAMPLES`` continuations of 4 tokens at T = 1 in batches of 4, and tests every output position
against the *exact* target distribution given the sampled prefix (transformers, float32): a
chi-square on the sampled token's rank bins. This is stronger than the two-sample tests of
tests/test_exactness.py (no second sample's noise; every position, not only 2-3) and it covers
the paths a policy takes rarely. The power is stated (``detectable_shift``: the mass moved from
the most likely token to the second that is detected with probability 0.9) and shown in the same
run by a negative control: the plain engine at T = 0.95 must fail the same test against T = 1.
"""

from __future__ import annotations

import json
import sys

import pytest
from engine_subprocess import REPO, run_engine_script

pytestmark = pytest.mark.slow  # starts vLLM engines (one child process)

SAMPLES = 2000
LEVEL = 0.001 / 4  # per position, Bonferroni over the 4 positions
CONTROL_TEMPERATURE = 0.95


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("schedule") / "report.json"
    script = REPO / "scripts" / "draft_schedule_exactness.py"
    return run_engine_script(script, ["--samples", str(SAMPLES), "--engines", "plain-control,bebop-random",
                                      "--control-temperature", str(CONTROL_TEMPERATURE), "--out", str(out)],
                             out, timeout=1800, label="random draft schedule engines")


def test_random_schedule_took_every_path(report):
    stats = report["engines"]["bebop-random"]["stats"]
    assert stats["plain_steps"] > 0.2 * stats["steps"], stats  # K = 0 steps, many right after drafts
    assert stats["drafted"] > SAMPLES and stats["accepted"] > 0, stats


def test_random_schedule_keeps_the_target_distribution(report):
    tests = report["engines"]["bebop-random"]["tests"]
    print(json.dumps([{k: t[k] for k in ("position", "p", "detectable_shift")} for t in tests]), file=sys.stderr)
    assert len(tests) == 4
    assert all(t["p"] > LEVEL for t in tests), tests


def test_test_has_power(report):
    """Negative control (T = 0.95 against T = 1) fails, and the stated detectable shift is small."""
    control = report["engines"]["plain-control"]["tests"]
    assert min(t["p"] for t in control) < LEVEL, control
    shifts = [t["detectable_shift"] for t in report["engines"]["bebop-random"]["tests"]]
    assert max(shifts) < 0.06, shifts
