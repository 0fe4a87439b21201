"""Run a test module's vLLM engine in a child process and read back its JSON result.

The engine tests start each engine in its own subprocess (vLLM tolerates one engine per process
best): the test module runs itself as a script, which writes its result to a JSON file. This is
the one copy of that launch, so every engine test gets the same environment and failure report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parent.parent
STDERR_TAIL = 6000  # characters of the child's stderr in a failure message (vLLM logs there)
STDOUT_TAIL = 2000  # and of its stdout, when it printed anything


def engine_env(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The child's environment: small CPU KV cache, offline hub, engine core in the child itself;
    then ``overrides`` (a value of None removes the variable)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_engine_script(script: str | Path, args: Sequence[str], result: Path, *, timeout: float, label: str,
                      env: Mapping[str, str | None] | None = None) -> Any:
    """Run ``python script *args`` from the repository root; return the JSON the child wrote to ``result``.

    ``args`` must tell the child where ``result`` is; ``env`` overrides variables of
    :func:`engine_env`. A non-zero exit raises AssertionError naming ``label`` (e.g. "bebop
    engine") with the exit status and the tail of the child's output; a child that runs past
    ``timeout`` seconds raises subprocess.TimeoutExpired.
    """
    proc = subprocess.run([sys.executable, str(script), *args], env=engine_env(env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        message = f"{label} failed (rc={proc.returncode}):\n{proc.stderr[-STDERR_TAIL:]}"
        if proc.stdout.strip():
            message += f"\n--- stdout (tail) ---\n{proc.stdout[-STDOUT_TAIL:]}"
        raise AssertionError(message)
    return json.loads(Path(result).read_text())


def exit_after_result() -> NoReturn:
    """End an engine child once its result file is written: flush, then ``os._exit(0)``.

    A normal interpreter exit after a vLLM engine spends 4-5 s on these CPUs in native teardown
    (no Python frame left: thread pools, the KV cache), per child; the tests do not check it (the
    ones that check an engine's own shutdown call ``close()`` before this). A child that fails
    raises before it gets here and exits non-zero as usual. Children this process started (vLLM's
    engine-core process, where a test keeps it) are killed first, so none outlives the test; the
    tests shut their engines down before this.
    """
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
