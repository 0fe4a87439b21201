"""Does a bebop step that drafts nothing cost what a plain step costs?

``draft_length="auto"`` drafts nothing in a crowded batch; those steps should run at plain
decoding's speed. Two engines, each held in its own process for the whole run: ``none`` (no
speculation) and ``bebop-off`` (method "bebop", auto draft length with ``draft_min_gain`` 1.0,
so no batch here ever drafts). For every batch size, each engine decodes the same held-out
prompts (``ignore_eos``, ``--tokens`` each, prefix cache emptied before every run) ``--repeats``
times, taking turns in alternating order; tokens/s medians and their ratio, from one run.

    python benchmarks/bench_no_draft_step.py --batches 1,16,64 --repeats 3

Writes ``benchmarks/results/no_draft_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ENGINES = ("none", "bebop-off")


def _worker(engine: str, model: str, heads: str, dtype: str, conn: Any) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from profile_step import spec_config
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=1024, enforce_eager=True, seed=0, dtype=dtype, max_num_seqs=256,
              speculative_config=spec_config(engine, heads, 3))
    llm.generate(["Hello"] * 4, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        prompts, tokens = msg
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=1.0),
                            use_tqdm=False)
        conn.send(sum(len(c.token_ids) for o in outs for c in o.outputs) / (time.perf_counter() - t0))


def main(argv: list[str] | None = None) -> int:
    from _results import write_results
    from bench_throughput import interleaved_prompts

    from bebop_vllm.hardware import fast_engine_dtype, machine_info
    from bebop_vllm.paths import SHIPPED_HEADS_DIR, default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--batches", default="1,16,64", help="batch sizes (default 1,16,64)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per engine and batch, median (default 3)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request (default 64)")
    ap.add_argument("--model", default=str(default_model_dir()), help="target model folder (default model)")
    ap.add_argument("--heads", default=str(SHIPPED_HEADS_DIR), help="heads folder (default: shipped heads)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="engine dtype (auto: from the CPU flags)")
    ap.add_argument("--out", default="benchmarks/results/no_draft_step", help="output prefix (.json/.md)")
    args = ap.parse_args(argv)
    dtype = fast_engine_dtype() if args.dtype == "auto" else args.dtype
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    batches = [int(b) for b in args.batches.split(",")]
    prompts = interleaved_prompts(args.model, ["math", "code", "agentic"], max(batches), 400)

    t_start = time.perf_counter()
    ctx = mp.get_context("spawn")
    conns = {}
    for e in ENGINES:
        parent, child = ctx.Pipe()
        ctx.Process(target=_worker, args=(e, args.model, args.heads, dtype, child), daemon=True).start()
        if parent.recv() != "ready":
            raise SystemExit(f"engine {e} failed to start")
        conns[e] = parent
    rows = []
    for b in batches:
        runs: dict[str, list[float]] = {e: [] for e in ENGINES}
        for r in range(args.repeats):
            for e in ENGINES if r % 2 == 0 else ENGINES[::-1]:
                conns[e].send((prompts[:b], args.tokens))
                runs[e].append(conns[e].recv())
        med = {e: statistics.median(v) for e, v in runs.items()}
        rows.append({"batch": b, "tok_s_runs": runs, "tok_s": med, "ratio": med["bebop-off"] / med["none"]})
        print(f"batch {b}: none {med['none']:.1f}, bebop-off {med['bebop-off']:.1f} tok/s, "
              f"ratio {rows[-1]['ratio']:.3f}", file=sys.stderr, flush=True)
    for c in conns.values():
        c.send(None)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    res = {"command": command, "machine": machine_info(), "dtype": dtype, "heads": args.heads,
           "tokens": args.tokens, "repeats": args.repeats, "rows": rows, "wall_s": time.perf_counter() - t_start}
    table = ["| batch | plain tok/s | bebop, no drafts, tok/s | ratio | runs (plain / bebop) |",
             "|---|---|---|---|---|"]
    for r in rows:
        runs = " / ".join(", ".join(f"{x:.0f}" for x in r["tok_s_runs"][e]) for e in ENGINES)
        table.append(f"| {r['batch']} | {r['tok_s']['none']:.1f} | {r['tok_s']['bebop-off']:.1f} | "
                     f"{r['ratio']:.3f} | {runs} |")
    from bebop_vllm.hardware import describe_machine

    md = "\n".join(["# A bebop step that drafts nothing vs a plain step", "", f"Command: `{command}`", "",
                    f"Machine: {describe_machine(res['machine'])}. dtype {dtype}, heads {args.heads}, "
                    f"{args.tokens} tokens per request at T = 1, {args.repeats} runs per cell (median), "
                    f"wall {res['wall_s']:.0f} s.", "", *table, ""])
    write_results(Path(args.out), res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
