"""``bebop demo``: Bebop vs no speculation on held-out prompts of the three domains."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help="run the Bebop demo on the embedded default model",
        description="Generate answers for held-out prompts of the three domains (math, code, "
        "agentic) on the default model twice - without speculation and with Bebop (shipped MTP "
        "heads, our rejection sampler) - and print per request tokens/s, Bebop's acceptance "
        "rate, mean accepted length and target entropy, then batch-1 and batched tokens/s "
        "ratios measured back to back in the same run.")
    p.add_argument("--model", default=None,
                   help="target model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--heads", default=None,
                   help="heads folder (default: the shipped heads for the default model); "
                   "'random' builds untrained heads for a plumbing-only run (low acceptance)")
    p.add_argument("--num-speculative-tokens", type=int, default=3,
                   help="draft tokens per verify step (default: 3)")
    p.add_argument("--prompts-per-domain", type=int, default=2,
                   help="held-out prompts per domain (default: 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--batch", type=int, default=16,
                   help="requests in the batched throughput run (default: 16)")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="engine context length (default: 2048)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    return p


def run(args: argparse.Namespace) -> int:
    from bebop_vllm.demo import run_demo

    return run_demo(args)
