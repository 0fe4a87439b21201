"""``bebop demo``: generate on the default model with vLLM and report tokens/s."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="run the Bebop demo on the embedded default model",
        description="Generate answers for held-out prompts of the three domains "
        "with vLLM on the default model and print the text and tokens/s at "
        "batch 1 and at full batch.",
    )
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prompts-per-domain", type=int, default=2, help="held-out prompts per domain (default: 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--batch", type=int, default=16, help="requests in the batched throughput run (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    return p


def run(args: argparse.Namespace) -> int:
    from bebop_vllm.demo import run_demo

    return run_demo(args)
