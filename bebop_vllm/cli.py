"""The ``bebop`` command line.

Each subcommand lives in its own module under ``bebop_vllm.commands`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``; modules are imported lazily so that
``bebop --help`` stays fast and a subcommand's heavy imports (vLLM, torch) are paid only
when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bebop_vllm.errors import BebopError

# name -> module under bebop_vllm.commands (order = order in --help)
SUBCOMMANDS: dict[str, str] = {
    "fetch-model": "fetch_model",
    "demo": "demo",
    "serve": "serve",
    "prompts": "prompts",
    "generate-data": "generate_data",
    "train": "train",
    "draft-vocab": "draft_vocab",
    "export-mtp": "export_mtp",
    "make-heads": "make_heads",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bebop",
        description="Bebop: trained MTP heads + exact rejection sampling for vLLM speculative "
        "decoding. Run `bebop COMMAND --help` for each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        mod = importlib.import_module(f"bebop_vllm.commands.{module}")
        p = mod.add_parser(sub, name)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except BebopError as e:
        print(f"bebop {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bebop {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
