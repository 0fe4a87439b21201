"""Where bebop keeps its files: ``BEBOP_HOME`` (default: the user's cache dir)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Heads shipped in the repository for the default model: KL-trained heads fine-tuned
# with the end-to-end TV loss (docs/training.md has the commands and the comparison).
SHIPPED_HEADS_DIR = REPO_ROOT / "heads" / "smollm2-135m-v8"


def bebop_home() -> Path:
    """The bebop cache folder: ``$BEBOP_HOME`` or ``$XDG_CACHE_HOME/bebop`` or ``~/.cache/bebop``."""
    env = os.environ.get("BEBOP_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "bebop"


def default_model_dir() -> Path:
    """The converted bf16 safetensors folder of the embedded default model."""
    return bebop_home() / "models" / DEFAULT_MODEL_NAME
