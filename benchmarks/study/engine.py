"""vLLM runs of the study, each engine in a fresh subprocess (``engine_worker.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("engine_worker.py")


class EngineRunError(RuntimeError):
    """An engine subprocess failed; the message points at its log."""


def speculative_config(head_dir: str, mode: str, num_depths: int) -> dict[str, Any]:
    """The bebop method's options for one head and draft mode (issue 5's schema)."""
    return {
        "method": "bebop",
        "model": head_dir,
        "num_speculative_tokens": num_depths,
        "draft_sampling": mode,
        "metrics": "summary",
    }


def run_engine_job(job: dict[str, Any], work_dir: Path, timeout_s: float = 1800) -> dict[str, Any]:
    """Run one job in a subprocess; vLLM's log goes to ``work_dir/<name>.log``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    name = job["name"]
    job_path, result_path, log_path = (work_dir / f"{name}.{ext}" for ext in ("job.json", "result.json", "log"))
    job_path.write_text(json.dumps(job) + "\n")
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    t0 = time.time()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(WORKER), str(job_path), str(result_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise EngineRunError(f"engine job {name!r} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = round(time.time() - t0, 1)
    return result
