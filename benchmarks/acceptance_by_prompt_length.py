"""Engine-measured acceptance on held-out prompts, split by prompt length (short vs long).

The training data skips prompts longer than ``--max-prompt-tokens`` of ``bebop generate-data``
(512 for the shipped heads), and 55 % of the agentic train prompts (tool lists) are longer. The
engine benchmarks do serve longer held-out prompts (up to their ``max_model_len``), so this asks:
do the heads accept less after a prompt longer than any they were trained behind? One engine
(bebop, fixed k, eager: acceptance does not depend on compilation), one domain, the first ``--per-group``
held-out prompts of each length group, ``--max-tokens`` sampled tokens each at ``--temperature``;
tokens per verify step pooled over each group's requests (1 + accepted / verify steps) and the
cumulative acceptance per draft position, from the per-request metrics:

    python benchmarks/acceptance_by_prompt_length.py --domain agentic \
        --out benchmarks/results/acceptance_by_prompt_length_v7

Runs the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Sampling follows the engine's
seed (0), so a rerun on the same machine repeats the numbers; requests carry no seeds of their own
(the engine seed is enough here; per-request seeds with chunked prefills work on bebop CPU engines
since the cpu_seeded_chunks patch). Read a difference between the groups against the per-request
spread printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bebop_vllm.hardware import describe_machine_and_load, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Engine acceptance on short vs long held-out prompts of one domain.")
    p.add_argument("--domain", default="agentic", choices=("math", "code", "agentic"),
                   help="prompt domain (default agentic)")
    p.add_argument("--heads", type=Path, default=None, help="heads folder (default: the shipped heads)")
    p.add_argument("--split-at", type=int, default=512,
                   help="prompts of at most this many tokens are 'short' (default 512: the training data's cap)")
    p.add_argument("--max-model-len", type=int, default=1024, help="engine max_model_len; long prompts must fit "
                   "with --max-tokens (default 1024, as bench_throughput)")
    p.add_argument("--per-group", type=int, default=16, help="prompts per length group (default 16)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens sampled per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--k", type=int, default=3, help="drafts per verify step, fixed (default 3)")
    p.add_argument("--out", type=Path, required=True, help="results path without suffix (.json and .md are written)")
    return p.parse_args(argv)


def group_prompts(domain: str, tokenizer: Any, split_at: int, longest: int, per_group: int) -> dict[str, list[dict]]:
    """The first ``per_group`` held-out prompts of ``domain`` with <= split_at tokens ("short") and
    with split_at < tokens <= longest ("long"), rendered with the chat template."""
    from bebop_vllm.data import load_prompts, render

    groups: dict[str, list[dict]] = {"short": [], "long": []}
    for p in load_prompts([domain], split="heldout"):
        text = render(p, tokenizer)
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        name = "short" if n <= split_at else "long" if n <= longest else None
        if name and len(groups[name]) < per_group:
            groups[name].append({"id": p.id, "tokens": n, "text": text})
    return groups


def pooled_acceptance(metrics: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """Tokens per verify step pooled over requests, cumulative acceptance per position, and the
    per-request tokens per step (vLLM's ``mean_acceptance_length``, for the spread), from the
    per-request metrics payloads (``spec_decode_metrics.to_dict()``)."""
    steps = sum(m["num_spec_steps"] for m in metrics)
    accepted = [sum(m["num_accepted_tokens_per_pos"][j] for m in metrics) for j in range(k)]
    per_request = [m["mean_acceptance_length"] for m in metrics if m["num_spec_steps"]]
    return {
        "verify_steps": steps,
        "tokens_per_step": 1 + sum(m["num_accepted_draft_tokens"] for m in metrics) / steps if steps else None,
        "accepted_at_position": [a / steps if steps else None for a in accepted],
        "per_request_tokens_per_step": per_request,
        "per_request_median": statistics.median(per_request) if per_request else None,
        "per_request_stdev": statistics.stdev(per_request) if len(per_request) > 1 else None,
    }


def markdown(out: dict[str, Any]) -> str:
    lines = [f"# Engine acceptance by prompt length ({out['domain']}, T = {out['temperature']}, k = {out['k']} fixed)",
             "", f"`{out['command']}`", "", f"Machine: {out['machine_line']}.", "",
             f"Heads: `{out['heads']}`. Short: prompts of at most {out['split_at']} tokens (the training data's "
             f"cap); long: {out['split_at'] + 1}-{out['longest']}. {out['max_tokens']} tokens per prompt.", "",
             "| group | prompts | prompt tokens (median) | tokens / verify step (pooled) | per request: median ± sd "
             "| accepted at position 1 / 2 / 3 (per verify step) |",
             "|---|---|---|---|---|---|"]
    for name, g in out["groups"].items():
        r = g["result"]
        acc = " / ".join(f"{a:.3f}" for a in r["accepted_at_position"])
        sd = f"{r['per_request_stdev']:.2f}" if r["per_request_stdev"] is not None else "-"
        lines.append(f"| {name} | {g['prompts']} | {g['median_prompt_tokens']} | {r['tokens_per_step']:.3f} | "
                     f"{r['per_request_median']:.2f} ± {sd} | {acc} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from bebop_vllm.paths import SHIPPED_HEADS_DIR, default_model_dir

    machine = machine_info()
    model = str(default_model_dir())
    heads = str(args.heads or SHIPPED_HEADS_DIR)
    longest = args.max_model_len - args.max_tokens - 8
    groups = group_prompts(args.domain, AutoTokenizer.from_pretrained(model), args.split_at, longest, args.per_group)
    if not all(groups.values()):
        raise SystemExit(f"no held-out {args.domain} prompt in a length group: "
                         f"{ {n: len(g) for n, g in groups.items()} } (lower --split-at or raise --max-model-len)")
    llm = LLM(model=model, max_model_len=args.max_model_len, enforce_eager=True, seed=0, dtype="auto",
              max_num_seqs=args.per_group,
              speculative_config={"method": "bebop", "model": heads, "num_speculative_tokens": args.k,
                                  "draft_length": "fixed"})
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    out: dict[str, Any] = {
        "command": "python benchmarks/acceptance_by_prompt_length.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine, "machine_line": describe_machine_and_load(machine), "heads": heads,
        "domain": args.domain, "temperature": args.temperature, "k": args.k, "split_at": args.split_at,
        "longest": longest, "max_tokens": args.max_tokens, "groups": {},
    }
    for name, prompts in groups.items():
        outputs = llm.generate([p["text"] for p in prompts], params, use_tqdm=True)
        metrics = [o.outputs[0].spec_decode_metrics.to_dict() for o in outputs]
        out["groups"][name] = {
            "prompts": len(prompts), "ids": [p["id"] for p in prompts],
            "median_prompt_tokens": int(statistics.median(p["tokens"] for p in prompts)),
            "result": pooled_acceptance(metrics, args.k),
        }
    write_results(args.out, out, markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
