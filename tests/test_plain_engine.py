"""bebop-vllm installed must not change a plain engine: same outputs with and without the plugin.

Two runs of the same non-speculative engine, each in its own subprocess (one engine per process):
``with_bebop`` (the plugin loads through its entry point, as in any environment where
bebop-vllm is installed) and ``without_bebop`` (``VLLM_PLUGINS`` lists every installed vLLM
plugin except bebop). Greedy, seeded random (T = 1, top-k / top-p, penalties) and logprob
requests must give identical token ids, texts and logprobs. Each run reports whether bebop's
patches were in place in the worker, so the comparison cannot pass by both runs lacking (or
both having) the plugin. Generation times are printed for information (one repeat; the speed
claim needs a benchmark, not a test).
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import distributions
from pathlib import Path

import pytest
from engine_subprocess import exit_after_result, run_engine_script

pytestmark = pytest.mark.slow  # starts vLLM engines (subprocesses)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Question: What is 12 * 7? Answer:",
    "Write a haiku about the sea.\n",
]
PARAMS = [
    {"temperature": 0.0, "max_tokens": 32},
    {"temperature": 0.0, "max_tokens": 16, "logprobs": 3},
    {"temperature": 1.0, "max_tokens": 32, "seed": 7},
    {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "max_tokens": 32, "seed": 11},
    {"temperature": 1.0, "repetition_penalty": 1.2, "max_tokens": 32, "seed": 3},
]


def _model_dir() -> Path:
    from bebop_vllm.paths import default_model_dir

    return default_model_dir()


def _other_plugins() -> str:
    """Every installed vLLM plugin name except bebop's, comma-separated (VLLM_PLUGINS syntax)."""
    names = {ep.name for dist in distributions() for ep in dist.entry_points
             if ep.group.startswith("vllm.") and ep.name != "bebop"}
    return ",".join(sorted(names))


def _bebop_state(worker) -> dict:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import bebop_vllm.plugin as plugin
    from bebop_vllm.plugin.patches.cpu_seeded_chunks import BEBOP_FLAG as SEEDED_CHUNKS_FLAG

    return {"runner_init_patched": getattr(GPUModelRunner.__init__, "__bebop_patch__", None) is not None,
            "disabled_reason": plugin.disabled_reason,
            "seeded_chunks_flag": bool(getattr(worker.model_runner, SEEDED_CHUNKS_FLAG, False))}


def _worker(out_path: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(_model_dir()), max_model_len=512, enforce_eager=True, seed=0)
    state = llm.collective_rpc(_bebop_state)[0]
    prompts = [p for p in PROMPTS for _ in PARAMS]
    params = [SamplingParams(**kw) for _ in PROMPTS for kw in PARAMS]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    results = [{
        "token_ids": list(o.outputs[0].token_ids),
        "text": o.outputs[0].text,
        "logprobs": None if o.outputs[0].logprobs is None else [
            {str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs],
        "spec": o.outputs[0].spec_decode_metrics is not None,
    } for o in outs]
    Path(out_path).write_text(json.dumps({"state": state, "results": results, "seconds": seconds}))


def _run(name: str, tmp: Path, plugins: str | None) -> dict:
    out = tmp / f"{name}.json"
    return run_engine_script(__file__, [str(out)], out, timeout=900, label=f"{name} engine",
                             env={"VLLM_PLUGINS": plugins})  # None: unset, every installed plugin loads


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    if not (_model_dir() / "config.json").is_file():
        pytest.fail(f"default model missing at {_model_dir()}: run `bebop fetch-model` first")
    tmp = tmp_path_factory.mktemp("plain")
    out = {"with_bebop": _run("with_bebop", tmp, None), "without_bebop": _run("without_bebop", tmp, _other_plugins())}
    print({k: round(v["seconds"], 2) for k, v in out.items()})
    return out


def test_plugin_loaded_only_where_expected(runs):
    # the runner flag of the CPU seeded-chunks patch is set on bebop engines only
    assert runs["with_bebop"]["state"] == {"runner_init_patched": True, "disabled_reason": None,
                                           "seeded_chunks_flag": False}
    assert runs["without_bebop"]["state"]["runner_init_patched"] is False


def test_plain_engine_outputs_identical(runs):
    with_b, without_b = runs["with_bebop"]["results"], runs["without_bebop"]["results"]
    assert len(with_b) == len(without_b) == len(PROMPTS) * len(PARAMS)
    for i, (a, b) in enumerate(zip(with_b, without_b, strict=True)):
        assert a == b, (i, PARAMS[i % len(PARAMS)], a, b)
        assert a["spec"] is False


if __name__ == "__main__":
    _worker(sys.argv[1])
    exit_after_result()
