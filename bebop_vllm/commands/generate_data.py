"""``bebop generate-data``: sample self-distillation data from the target with vLLM."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help="sample target continuations (vLLM) for head training and held-out evaluation",
        description="Sample continuations from the target with vLLM for the train split (training data) and "
        "the held-out split (evaluation only) of the math, code and agentic prompt sets, stored as int32 "
        "token arrays with their provenance under $BEBOP_HOME/data.",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="target model folder (default: the fetched SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="dataset folder (default: $BEBOP_HOME/data/smollm2-135m-selfdistill)"
    )
    p.add_argument(
        "--domain",
        choices=["math", "code", "agentic"],
        action="append",
        help="domain(s) (default: all three); repeatable",
    )
    p.add_argument("--train-per-domain", type=int, default=150, help="train prompts per domain (default: 150)")
    p.add_argument("--heldout-per-domain", type=int, default=16, help="held-out prompts per domain (default: 16)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="skip prompts longer than this (default: 512)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens sampled per prompt (default: 256)")
    p.add_argument(
        "--temperature",
        type=float,
        action="append",
        help="sampling temperature (default: 1.0); repeat for a mix: sample s of prompt i uses the "
        "(i + s)-th entry, cycling, so '--temperature 1 --temperature 1 --temperature 1 --temperature 0.7' "
        "samples 75 %% at T = 1 and 25 %% at T = 0.7",
    )
    p.add_argument(
        "--samples-per-prompt",
        action="append",
        metavar="N|DOMAIN=N",
        help="continuations per prompt, for every domain (N) or one domain (e.g. math=8); repeatable "
        "(default: one per --temperature entry)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=128,
        help="requests vLLM runs concurrently (default: 128); raise VLLM_CPU_KVCACHE_SPACE (GiB) to fit them",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument(
        "--engine",
        choices=["vllm", "hf", "prompts"],
        default="vllm",
        help="sampler: vllm (default), or hf (transformers, fp32; also stores the target hidden states the "
        "trainer needs, saving a second target pass on CPU), or prompts (no sampling: store the prompts' own "
        "text; train on it with `bebop train --train-on-prompts` when sampling is too slow)",
    )
    p.add_argument(
        "--split",
        choices=["heldout", "train"],
        action="append",
        help="split(s) to generate (default: heldout then train); repeatable",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="vLLM compute dtype (default: auto = bfloat16 on CUDA or where the CPU has avx512_bf16/AMX, "
        "float32 elsewhere: vLLM emulates bf16 on AVX2-only CPUs, several times slower)",
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=48,
        help="prompts per vLLM call; data is saved after each chunk and a rerun continues (default: 48)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from bebop_vllm.errors import BebopError
    from bebop_vllm.hardware import fast_engine_dtype
    from bebop_vllm.paths import default_model_dir
    from bebop_vllm.train.dataset import default_data_dir
    from bebop_vllm.train.generate import generate_data

    for name in ("train_per_domain", "heldout_per_domain", "max_prompt_tokens", "max_new_tokens", "chunk"):
        if getattr(args, name) < 1:
            raise BebopError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    temps = args.temperature or [1.0]
    if any(t <= 0 for t in temps):
        raise BebopError(f"--temperature must be > 0 (sampling, not greedy), got {temps}")
    samples: dict[str, int] = {}
    for item in args.samples_per_prompt or []:
        domain, _, n = item.rpartition("=")
        if not n.isdigit() or int(n) < 1 or (domain and domain not in ("math", "code", "agentic")):
            raise BebopError(
                f"--samples-per-prompt takes N or DOMAIN=N (N >= 1, DOMAIN math/code/agentic), got {item!r}"
            )
        for d in [domain] if domain else ["math", "code", "agentic"]:
            samples[d] = int(n)
    if args.max_num_seqs < 1:
        raise BebopError(f"--max-num-seqs must be at least 1, got {args.max_num_seqs}")
    generate_data(
        args.model or default_model_dir(),
        args.out or default_data_dir(),
        args.domain,
        args.train_per_domain,
        args.heldout_per_domain,
        args.max_prompt_tokens,
        args.max_new_tokens,
        temps,
        args.seed,
        tuple(args.split or ("heldout", "train")),
        args.chunk,
        args.engine,
        fast_engine_dtype() if args.dtype == "auto" else args.dtype,
        samples or None,
        args.max_num_seqs,
    )
    return 0
