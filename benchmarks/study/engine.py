"""vLLM runs of the study: a pool of engines, each in its own process, all alive at once.

- ``sample``: batched sampling of continuations by the no-speculation engine (the held-out
  sequences the analytic part teacher-forces), one request per (prompt, temperature), seeded.
- ``timed``: batch-1 generation, one request at a time, every request run on every engine back
  to back in rotating order (so drifts of machine load hit all engines alike), each timed on its
  own, with the per-request speculative metrics bebop attaches to
  ``CompletionOutput.spec_decode_metrics`` (acceptance histogram, mean target entropy).

An engine that fails to start is reported (with its log tail) and left out; the others go on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any


def speculative_config(head_dir: str, mode: str, num_depths: int) -> dict[str, Any]:
    """The bebop method's options for one head and draft mode (the schema of bebop_vllm.config.BebopOptions)."""
    return {
        "method": "bebop",
        "model": head_dir,
        "num_speculative_tokens": num_depths,
        "draft_sampling": mode,
        "metrics": "summary",
        # the study measures acceptance and cost at a given k: the cost-aware default ("auto")
        # could decide not to draft at all on a busy machine and leave nothing to measure
        "draft_length": "fixed",
    }


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
    out.pop("per_step_accepted", None)
    out.pop("per_step_drafted", None)
    return out


def _worker(spec: dict[str, Any], log_path: str, conn: Any) -> None:
    """Holds one engine and answers ("sample", ...), ("timed", ...) and ("stop",) messages."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            model=spec["model"], dtype=spec.get("dtype", "bfloat16"), max_model_len=spec["max_model_len"],
            seed=spec["seed"], enforce_eager=True, enable_prefix_caching=False,
        )
        if spec.get("speculative_config"):
            kwargs["speculative_config"] = spec["speculative_config"]
        llm = LLM(**kwargs)
        llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=8), use_tqdm=False)
        conn.send(("ready", round(time.perf_counter() - t0, 1)))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        conn.send(("error", repr(exc)))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == "sample":
            _, prompts, params = msg
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                [SamplingParams(**p) for p in params], use_tqdm=False)
            conn.send([(list(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs])
        elif msg[0] == "timed":
            _, ids, params = msg
            t1 = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=ids)], [SamplingParams(**params)], use_tqdm=False)
            dt = time.perf_counter() - t1
            c = out[0].outputs[0]
            conn.send({"tokens": list(c.token_ids), "seconds": dt, "finish_reason": c.finish_reason,
                       "spec": _spec_metrics(c)})


class EnginePool:
    """Engines by name, each in a spawned process; start-up one at a time (it is CPU-heavy)."""

    def __init__(self, specs: dict[str, dict[str, Any]], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        ctx = mp.get_context("spawn")
        self.workers: dict[str, tuple[Any, Any]] = {}
        self.errors: dict[str, str] = {}
        self.startup_seconds: dict[str, float] = {}
        for name, spec in specs.items():
            log = log_dir / f"{name}.log"
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(spec, str(log), child), daemon=True)
            proc.start()
            print(f"starting engine {name} (log: {log}) ...", file=sys.stderr, flush=True)
            msg = parent.recv() if parent.poll(1800) else ("error", "no answer within 1800 s")
            if msg[0] == "ready":
                self.workers[name] = (proc, parent)
                self.startup_seconds[name] = msg[1]
            else:
                tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
                self.errors[name] = f"{msg[1]}\n--- log tail ---\n{tail}"
                print(f"engine {name} FAILED to start: {msg[1]} (see {log})", file=sys.stderr, flush=True)
                proc.join(timeout=30)

    def names(self) -> list[str]:
        return list(self.workers)

    def sample(self, name: str, prompts: list[list[int]], params: list[dict[str, Any]]) -> list[Any]:
        conn = self.workers[name][1]
        conn.send(("sample", prompts, params))
        return conn.recv()

    def timed(self, name: str, ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
        conn = self.workers[name][1]
        conn.send(("timed", ids, params))
        return conn.recv()

    def close(self) -> None:
        for proc, conn in self.workers.values():
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
        self.workers.clear()
