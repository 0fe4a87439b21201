"""One vLLM engine in its own process: ``python engine_worker.py JOB.json RESULT.json``.

The study runs every engine configuration (no speculation, bebop with each head and draft
mode) in a fresh subprocess, so engines never share a process and a crash in one is
reported, not fatal. A job may ask for:

- ``sample``: batched sampling of continuations (the held-out sequences the analytic part
  teacher-forces), one request per (prompt, temperature), per-request seeds;
- ``timed``: batch-1 generation, one request at a time, each timed on its own (decode speed as
  a single user sees it, where speculative decoding helps), with the per-request speculative
  metrics vLLM/bebop attach to ``CompletionOutput.spec_decode_metrics``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _spec_metrics(completion: Any) -> dict[str, Any] | None:
    """The per-request speculative metrics as a plain dict (whatever fields the plugin adds)."""
    m = getattr(completion, "spec_decode_metrics", None)
    if m is None:
        return None
    out: dict[str, Any] = {}
    if hasattr(m, "to_dict"):
        try:
            out.update(m.to_dict())
        except Exception as exc:  # noqa: BLE001 - report, don't crash the run
            out["to_dict_error"] = repr(exc)
    for name in dir(m):
        if name.startswith("_") or name in out:
            continue
        value = getattr(m, name, None)
        if callable(value):
            continue
        if isinstance(value, (int, float, str, bool, list, dict)) or value is None:
            out[name] = value
    return out


def _params(sampling_params_cls: Any, temperature: float, max_tokens: int, seed: int) -> Any:
    return sampling_params_cls(temperature=temperature, max_tokens=max_tokens, seed=seed)


def main(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = dict(
        model=job["model"],
        dtype="bfloat16",
        max_model_len=job["max_model_len"],
        seed=job["seed"],
        enforce_eager=True,
        enable_prefix_caching=False,
    )
    if job.get("speculative_config"):
        kwargs["speculative_config"] = job["speculative_config"]
    llm = LLM(**kwargs)
    result: dict[str, Any] = {"name": job["name"], "startup_seconds": round(time.perf_counter() - t0, 1)}

    sample = job.get("sample")
    if sample:
        prompts, params, index = [], [], []
        for ti, temp in enumerate(sample["temperatures"]):
            for i, ids in enumerate(sample["prompts"]):
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(_params(SamplingParams, temp, sample["max_tokens"], sample["seeds"][i] * 31 + ti))
                index.append((ti, i))
        t1 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        result["sample_seconds"] = round(time.perf_counter() - t1, 2)
        result["sample"] = [
            {
                "temperature": sample["temperatures"][ti],
                "prompt_index": i,
                "tokens": list(o.outputs[0].token_ids),
                "finish_reason": o.outputs[0].finish_reason,
            }
            for (ti, i), o in zip(index, outs, strict=True)
        ]

    timed = job.get("timed")
    if timed:
        warm = timed["prompts"][0]
        for _ in range(int(timed.get("warmup", 1))):
            llm.generate([TokensPrompt(prompt_token_ids=warm)], [_params(SamplingParams, 1.0, 16, 0)], use_tqdm=False)
        rows = []
        for temp in timed["temperatures"]:
            for i, ids in enumerate(timed["prompts"]):
                p = _params(SamplingParams, temp, timed["max_tokens"], timed["seeds"][i])
                t1 = time.perf_counter()
                out = llm.generate([TokensPrompt(prompt_token_ids=ids)], [p], use_tqdm=False)
                dt = time.perf_counter() - t1
                c = out[0].outputs[0]
                rows.append(
                    {
                        "temperature": temp,
                        "prompt_index": i,
                        "tokens": list(c.token_ids),
                        "seconds": dt,
                        "finish_reason": c.finish_reason,
                        "spec": _spec_metrics(c),
                    }
                )
                print(f"[{job['name']}] T={temp} request {i}: {len(c.token_ids)} tokens in {dt:.2f} s", flush=True)
        result["timed"] = rows
    Path(result_path).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: engine_worker.py JOB.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
