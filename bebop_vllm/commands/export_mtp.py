"""``bebop export-mtp``: bebop heads in place of a Qwen3.5 target's native MTP weights."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="write a copy of a Qwen3.5 target whose native MTP weights (mtp.*) are bebop heads",
        description="For targets that ship native MTP layers (dense Qwen3.5 text models, model_type "
        "qwen3_5_text): copy the target folder to --out with every mtp.* tensor replaced by the "
        "heads' (`bebop train` on such a target makes qwen3_5-kind heads, warm-started from the "
        "native MTP module). Everything else is copied unchanged. Serve the result with vLLM's own "
        'method: --speculative-config \'{"method": "mtp", "num_speculative_tokens": 3}\'.',
    )
    p.add_argument("--heads", type=Path, required=True, help="heads folder written by `bebop train` for this target")
    p.add_argument("--target", type=Path, required=True, help="the Qwen3.5 target's Hugging Face folder")
    p.add_argument("--out", type=Path, required=True, help="new folder for the exported model (must not exist)")
    return p


def run(args: argparse.Namespace) -> int:
    from bebop_vllm.heads.native_mtp import export_native_mtp

    out = export_native_mtp(args.heads, args.target, args.out)
    print(f"wrote {out} (native MTP weights replaced; see {out / 'bebop-export.json'})")
    return 0
