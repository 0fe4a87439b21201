"""``bebop serve``: vLLM's OpenAI server with the bebop plugin (all ``vllm serve`` arguments)."""

from __future__ import annotations

import argparse
from typing import Any


class _PassThroughParser(argparse.ArgumentParser):
    """Hands every argument to vLLM's own ``vllm serve`` parser (which also owns ``--help``).

    A plain subparser would reject ``--port`` or ``--help`` before vLLM could see them.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[Any, list[str]]:
        namespace = namespace if namespace is not None else argparse.Namespace()
        for key, value in self._defaults.items():  # set_defaults(), e.g. the command to run
            setattr(namespace, key, value)
        namespace.vllm_args = list(args or [])
        return namespace, []


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    previous = sub._parser_class
    sub._parser_class = _PassThroughParser
    try:
        return sub.add_parser(
            name, add_help=False,
            help="run vLLM's OpenAI-compatible server with bebop (same arguments as `vllm serve`; "
            "`bebop serve --help` lists them)",
            description="bebop serve [MODEL] [vllm serve options]: see `bebop serve --help`.")
    finally:
        sub._parser_class = previous


def run(args: argparse.Namespace) -> int:
    from bebop_vllm.serve import serve

    return serve(args.vllm_args)
