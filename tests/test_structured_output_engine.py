"""Structured outputs (JSON schema) with method "bebop": valid JSON, and at T = 0 the ids of plain decoding.

With a grammar, vLLM checks each draft against it: on the synchronous path invalid drafts are cut
from the proposal; with asynchronous scheduling (vLLM's default on GPU) they are kept as -1 so
that the number of scheduled tokens does not change, and the verifier must reject them at their
position (``vllm/v1/core/sched/scheduler.py`` ``update_draft_token_ids_in_output``). The unit
tests in tests/test_verifier_contract.py pin that rule against vLLM's own RejectionSampler; this
module checks it end to end on engines:

- every completion parses as JSON and validates against its schema (T = 0 and T = 1);
- T = 0 token ids are identical to plain decoding with the same schema;
- bebop's verifier really ran and checked drafts;
- both with synchronous and with asynchronous scheduling. vLLM's CPU platform forces
  ``async_scheduling=False`` (``vllm/platforms/cpu.py``), so on CPU the asynchronous half is
  skipped with that reason; it runs on GPU hosts. Whether the platform would schedule
  asynchronously is asked of vLLM's own config logic in the synchronous bebop engine's process
  (``EngineArgs(async_scheduling=True).create_engine_config()``); the asynchronous engines start
  only where it would, and report the mode they ran.

Each engine runs in its own subprocess (tests/engine_subprocess.py). Heads: as every engine
test (tests/heads_under_test.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from engine_subprocess import exit_after_result, run_engine_script
from heads_under_test import heads_under_test

pytestmark = pytest.mark.slow  # starts vLLM engines (subprocesses)

MAX_MODEL_LEN = 512
NUM_SPEC = 3
MAX_TOKENS = 96
# Every field of both schemas is bounded (strings of <= 16 characters, an integer in 0..120, no
# optional or additional properties), so the grammar must close each object within MAX_TOKENS at
# any temperature: an unbounded field (a JSON number, whitespace between fields) let a T = 1
# sample run to MAX_TOKENS on CI machines, which says nothing about the verifier.

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "country": {"type": "string", "maxLength": 16},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
REQUESTS = [
    # (id, prompt, schema, temperature)
    ("person_t0", "Describe Ann, who is 31 years old, as a JSON object:\n", PERSON_SCHEMA, 0.0),
    ("city_t0", "The capital of France as JSON:\n", CITY_SCHEMA, 0.0),
    ("person_t0_b", "A JSON record for a person called Bob:\n", PERSON_SCHEMA, 0.0),
    ("person_t1", "Describe Ann, who is 31 years old, as a JSON object:\n", PERSON_SCHEMA, 1.0),
    ("city_t1", "The capital of Italy as JSON:\n", CITY_SCHEMA, 1.0),
]
ENGINES = ("plain_sync", "bebop_sync", "plain_async", "bebop_async")


def _worker(engine: str, heads: str, out_path: str) -> None:
    """Subprocess body: one engine, every request in one batch, results as JSON."""
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kind, scheduling = engine.split("_")
    spec = {"method": "bebop", "model": heads, "num_speculative_tokens": NUM_SPEC} if kind == "bebop" else None
    llm = LLM(
        model=str(_model_dir()), max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0,
        speculative_config=spec, async_scheduling=scheduling == "async",
        # compact JSON: with whitespace allowed between fields, a T = 1 sample of this 135M model
        # can loop on newlines until MAX_TOKENS (seen on a CI machine: '{"city": "ITALY_REL"' and
        # 90 newlines), which says nothing about the verifier. The grammar still cuts drafts.
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
    )
    params = [
        SamplingParams(temperature=t, max_tokens=MAX_TOKENS, seed=7 if t > 0 else None,
                       structured_outputs=StructuredOutputsParams(json=schema))
        for _, _, schema, t in REQUESTS
    ]
    outs = llm.generate([prompt for _, prompt, _, _ in REQUESTS], params, use_tqdm=False)
    result: dict = {
        "async_scheduling": bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling),
        "rejection_sampler": llm.collective_rpc(_rejection_sampler_name)[0],
    }
    if scheduling == "sync":
        # would this platform run an engine asynchronously? vLLM's own config logic answers (the
        # CPU platform turns it off); the fixture starts the async engines only where it would
        from vllm.engine.arg_utils import EngineArgs

        probe = EngineArgs(model=str(_model_dir()), max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                           async_scheduling=True).create_engine_config()
        result["async_scheduling_available"] = bool(probe.scheduler_config.async_scheduling)
    for (rid, _, _, _), out in zip(REQUESTS, outs, strict=True):
        c = out.outputs[0]
        result[rid] = {
            "token_ids": list(c.token_ids),
            "text": c.text,
            "finish_reason": c.finish_reason,
            "spec": None if c.spec_decode_metrics is None else c.spec_decode_metrics.to_dict(),
        }
    Path(out_path).write_text(json.dumps(result))


def _rejection_sampler_name(worker) -> str | None:
    rs = getattr(worker.model_runner, "rejection_sampler", None)
    return None if rs is None else type(rs).__name__


def _model_dir() -> Path:
    from bebop_vllm.paths import default_model_dir

    return default_model_dir()


def _run_engine(engine: str, heads: str, tmp: Path) -> dict:
    out = tmp / f"{engine}.json"
    return run_engine_script(__file__, [engine, heads, str(out)], out, timeout=1500, label=f"{engine} engine")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    if not (_model_dir() / "config.json").is_file():
        pytest.fail(f"default model missing at {_model_dir()}: run `bebop fetch-model` first")
    tmp = tmp_path_factory.mktemp("structured")
    heads = heads_under_test(tmp, NUM_SPEC)
    results = {}
    for engine in ENGINES:
        if engine.endswith("_async") and not results["bebop_sync"]["async_scheduling_available"]:
            # not started (two engine starts saved); _for_scheduling skips the async tests
            results[engine] = {"async_scheduling": False}
            continue
        results[engine] = _run_engine(engine, heads, tmp)
    return results


def _for_scheduling(results: dict, scheduling: str) -> tuple[dict, dict]:
    plain, bebop = results[f"plain_{scheduling}"], results[f"bebop_{scheduling}"]
    if scheduling == "async" and not bebop["async_scheduling"]:
        pytest.skip("this vLLM build ran the engine with synchronous scheduling (vLLM's CPU platform "
                    "forces async_scheduling=False); the asynchronous case needs a GPU host")
    assert plain["async_scheduling"] == bebop["async_scheduling"] == (scheduling == "async")
    return plain, bebop


@pytest.mark.parametrize("scheduling", ["sync", "async"])
def test_bebop_verifier_ran_and_checked_drafts(results, scheduling):
    plain, bebop = _for_scheduling(results, scheduling)
    assert bebop["rejection_sampler"] == "BebopRejectionSampler"
    assert plain["rejection_sampler"] is None
    drafted = sum((bebop[rid]["spec"] or {}).get("num_draft_tokens", 0) for rid, *_ in REQUESTS)
    assert drafted > 0, "no draft was verified: the grammar path of the verifier was not exercised"


@pytest.mark.parametrize("scheduling", ["sync", "async"])
@pytest.mark.parametrize("rid", [r[0] for r in REQUESTS])
def test_output_is_schema_valid_json(results, scheduling, rid):
    import jsonschema

    _, bebop = _for_scheduling(results, scheduling)
    schema = next(s for r, _, s, _ in REQUESTS if r == rid)
    out = bebop[rid]
    assert out["finish_reason"] == "stop", out  # MAX_TOKENS leaves room for these small objects
    jsonschema.validate(json.loads(out["text"]), schema)


@pytest.mark.parametrize("scheduling", ["sync", "async"])
@pytest.mark.parametrize("rid", [r[0] for r in REQUESTS if r[3] == 0.0])
def test_greedy_ids_identical_to_plain_decoding(results, scheduling, rid):
    plain, bebop = _for_scheduling(results, scheduling)
    assert bebop[rid]["token_ids"] == plain[rid]["token_ids"]


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
    exit_after_result()
