"""``bebop prompts``: show the prompt sets and their train / held-out split."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="list prompt counts per domain and split, or print prompts",
        description="Show the math (CHAMP), code (HumanEval) and agentic (BFCL v4) prompt sets and their "
        "deterministic train / held-out split.",
    )
    p.add_argument(
        "--domain",
        choices=["math", "code", "agentic"],
        action="append",
        help="domain(s) to show (default: all three); repeatable",
    )
    p.add_argument(
        "--split",
        choices=["train", "heldout", "all"],
        default="all",
        help="which split to print with --show (default: all)",
    )
    p.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help="print the first N prompts of each domain (chat messages as JSON)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    import json

    from bebop_vllm.data import DOMAINS, load_prompts

    domains = args.domain or list(DOMAINS)
    for d in domains:
        train, held = len(load_prompts([d], "train")), len(load_prompts([d], "heldout"))
        print(f"{d:8s} train {train:5d}  held-out {held:4d}")
        for p in load_prompts([d], args.split, limit_per_domain=args.show) if args.show else []:
            print(json.dumps({"id": p.id, "split": p.split, "messages": list(p.messages)})[:2000])
    return 0
