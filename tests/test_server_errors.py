"""``bebop serve`` refuses bad input with one clear line, before any engine or request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _serve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "bebop_vllm.cli", "serve", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_missing_model_folder_is_one_clear_error(tmp_path, capsys):
    from bebop_vllm.cli import main

    assert main(["serve", str(tmp_path / "no-such-model"), "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert "bebop serve: error: model folder" in err and "does not exist" in err


def test_invalid_bebop_option_fails_before_serving():
    from bebop_vllm.paths import default_model_dir

    spec = {"method": "bebop", "num_speculative_tokens": 3, "verifer": "bebop"}  # typo'd key
    proc = _serve(str(default_model_dir()), "--host", "127.0.0.1", "--port", "1",
                  "--max-model-len", "512", "--speculative-config", json.dumps(spec))
    assert proc.returncode != 0
    assert "unknown key 'verifer'" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
