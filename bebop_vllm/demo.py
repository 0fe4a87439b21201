"""The end-to-end demo behind ``bebop demo`` and the README's first command."""

from __future__ import annotations

import argparse
import time

from bebop_vllm.errors import BebopError


def _throughput(llm, prompts: list[str], params) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return n_tokens / dt, outs


def run_demo(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from bebop_vllm.data import DOMAINS, load_prompts, render
    from bebop_vllm.model_fetch import check_model_dir
    from bebop_vllm.paths import default_model_dir

    model = args.model or str(default_model_dir())
    if args.model is None and (why := check_model_dir(default_model_dir())) is not None:
        raise BebopError(f"default model not ready ({why}); run `bebop fetch-model` first")
    tok = AutoTokenizer.from_pretrained(model)
    prompts = load_prompts(DOMAINS, "heldout", limit_per_domain=args.prompts_per_domain)
    texts = [render(p, tok) for p in prompts]
    llm = LLM(model=model, dtype="bfloat16", max_model_len=4096, seed=args.seed)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed, ignore_eos=True)
    llm.generate(texts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    print(f"\n== {len(prompts)} held-out prompts, T={args.temperature}, {args.max_tokens} new tokens each ==")
    rates = []
    for p, text in zip(prompts, texts, strict=True):
        rate, outs = _throughput(llm, [text], params)
        rates.append(rate)
        answer = outs[0].outputs[0].text.replace("\n", " ")
        print(f"[{p.domain:7s} {p.id}] {rate:6.1f} tok/s | {answer[:160]}")
    batch = (texts * (args.batch // len(texts) + 1))[: args.batch]
    batch_rate, _ = _throughput(llm, batch, params)
    rates.sort()
    print(f"\nbatch 1:  median {rates[len(rates) // 2]:.1f} tok/s over {len(rates)} requests")
    print(f"batch {args.batch}: {batch_rate:.1f} tok/s")
    return 0
