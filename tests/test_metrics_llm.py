"""``LLM.generate`` view of the per-request metrics, method "bebop", one engine start.

The engine runs in a subprocess (this file as a script; vLLM's default multiprocess mode, so
the records cross the engine → frontend wire) with one mixed batch: greedy, sampled, seeded,
top-p, n = 3 and max_tokens = 1 requests, at very different temperatures and lengths. Checks:
every sequence has its own record (n > 1 included), its counts are explained by its own length,
entropies follow their own request's temperature, and the frontend's Prometheus registry
(the third view) moved by exactly the sum of the records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from engine_subprocess import exit_after_result, run_engine_script
from heads_under_test import heads_under_test

NUM_SPEC = 3
PROMPT = "Tell me a story about a lighthouse keeper."

# name -> SamplingParams kwargs (all ignore_eos, so lengths are exact)
REQUESTS = {
    "greedy": dict(temperature=0.0, max_tokens=20),
    "cold": dict(temperature=0.2, max_tokens=16, seed=1),
    "hot": dict(temperature=2.0, max_tokens=16, seed=2),
    "top_p": dict(temperature=0.7, top_p=0.9, max_tokens=12),
    "n3": dict(temperature=1.0, max_tokens=10, n=3, seed=3),
    "one": dict(temperature=1.0, max_tokens=1),
}

pytestmark = pytest.mark.slow


def _heads_dir(tmp: Path) -> str:
    return heads_under_test(tmp, NUM_SPEC)


def _engine_main(heads: str, out: str) -> None:
    from prometheus_client import REGISTRY
    from vllm import LLM, SamplingParams

    from bebop_vllm.paths import default_model_dir

    llm = LLM(model=str(default_model_dir()), dtype="bfloat16", max_model_len=512,
              enforce_eager=True, seed=0, per_request_spec_decode_metrics="detailed",
              speculative_config={"method": "bebop", "model": heads, "draft_length": "fixed",
                                  "num_speculative_tokens": NUM_SPEC})

    def prom() -> dict[str, float]:
        names = {"count": ("bebop:spec_decode_target_entropy_nats_count", {}),
                 "sum": ("bebop:spec_decode_target_entropy_nats_sum", {}),
                 "sequences": ("bebop:spec_decode_num_sequences_total", {})}
        for pos in range(NUM_SPEC):
            names[f"drafted{pos}"] = ("bebop:spec_decode_num_draft_tokens_per_pos_total",
                                      {"position": str(pos)})
            names[f"accepted{pos}"] = ("bebop:spec_decode_num_accepted_tokens_per_pos_total",
                                       {"position": str(pos)})
        return {k: REGISTRY.get_sample_value(n, lab) or 0.0 for k, (n, lab) in names.items()}

    before = prom()
    params = [SamplingParams(ignore_eos=True, **kw) for kw in REQUESTS.values()]
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    after = prom()
    result = {"prom_delta": {k: after[k] - before[k] for k in after}, "requests": {}}
    for name, req_out in zip(REQUESTS, outs, strict=True):
        result["requests"][name] = [
            {"len": len(c.token_ids), "cls": type(c.spec_decode_metrics).__name__,
             "spec": None if c.spec_decode_metrics is None else c.spec_decode_metrics.to_dict()}
            for c in req_out.outputs]
    Path(out).write_text(json.dumps(result))
    llm.llm_engine.engine_core.shutdown()  # the engine-core process ends with this one


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("metrics_llm")
    out = tmp / "result.json"
    # vLLM's default engine-core process (see the module docstring): the records cross the wire
    return run_engine_script(__file__, [_heads_dir(tmp), str(out)], out, timeout=900, label="bebop engine",
                             env={"VLLM_ENABLE_V1_MULTIPROCESSING": None})


def test_every_sequence_has_its_own_consistent_record(run):
    for name, kw in REQUESTS.items():
        seqs = run["requests"][name]
        assert len(seqs) == kw.get("n", 1), name
        for seq in seqs:
            assert seq["cls"] == "BebopSpecDecodeMetrics", name
            spec, length = seq["spec"], seq["len"]
            assert length == kw["max_tokens"], name
            steps, accepted = spec["num_spec_steps"], spec["num_accepted_draft_tokens"]
            # token 1 from prefill, then accepted + 1 per step (the last may overshoot by <= k)
            assert length - 1 <= steps + accepted <= length - 1 + NUM_SPEC, (name, spec)
            assert len(spec.get("per_step_accepted") or []) == steps
            decided = sum(min(a + 1, d) for a, d in zip(spec.get("per_step_accepted") or [],
                                                        spec.get("per_step_drafted") or [], strict=True))
            assert spec["num_entropy_tokens"] == decided, (name, spec)
            assert len(spec.get("per_step_target_entropy") or []) == steps
    assert run["requests"]["one"][0]["spec"]["num_spec_steps"] == 0
    # n = 3: three separate records (their step sequences need not match)
    n3 = [s["spec"] for s in run["requests"]["n3"]]
    assert all(s["num_spec_steps"] >= 1 for s in n3)


def test_entropy_follows_each_requests_own_temperature(run):
    cold = run["requests"]["cold"][0]["spec"]["mean_target_entropy"]
    hot = run["requests"]["hot"][0]["spec"]["mean_target_entropy"]
    assert cold is not None and hot is not None
    # T=2 over a 49k vocabulary is several nats; T=0.2 is nearly deterministic.
    assert hot > cold + 1.0, (cold, hot)


def test_prometheus_registry_equals_sum_of_records(run):
    specs = [s["spec"] for seqs in run["requests"].values() for s in seqs]
    delta = run["prom_delta"]
    assert delta["sequences"] == len(specs)
    assert delta["count"] == sum(s["num_entropy_tokens"] for s in specs)
    assert delta["sum"] == pytest.approx(
        sum((s["mean_target_entropy"] or 0.0) * s["num_entropy_tokens"] for s in specs), rel=1e-6)
    for pos in range(NUM_SPEC):
        assert delta[f"drafted{pos}"] == sum(s["num_draft_tokens_per_pos"][pos] for s in specs)
        assert delta[f"accepted{pos}"] == sum(s["num_accepted_tokens_per_pos"][pos] for s in specs)


if __name__ == "__main__":
    _engine_main(sys.argv[1], sys.argv[2])
    exit_after_result()
