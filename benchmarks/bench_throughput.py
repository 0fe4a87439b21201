"""Throughput: no speculation vs vLLM's own speculative path vs bebop, same heads, one run.

Engines (each in its own worker process, all alive at once; every cell runs them back to back
in rotating order so slow drifts of machine load hit all engines alike):

- ``none``        no speculation
- ``vllm-greedy`` vLLM's EAGLE path with our heads, greedy drafts, vLLM's verifier
- ``vllm-prob``   same, vLLM's probabilistic drafts (temperature only)
- ``bebop``       method "bebop": drafts from the request distribution, our verifier, a fixed
  k drafts per step (``draft_length="fixed"``)

Optional bebop variants (entropy-aware draft length against fixed lengths, same run):

- ``bebop-k<N>``       bebop with num_speculative_tokens = N instead of ``--k``
- ``bebop[-k<N>]-sync`` the same with synchronous scheduling
- ``bebop-auto``        bebop with ``draft_length="auto"`` (the plugin's default): 0..k drafts per
  request and step from the step-cost model
- ``bebop-entropy``     bebop, ``draft_length="entropy"`` with ``--acceptance-fit`` (0..k drafts
  per request and step)
- ``...-v<N>``          any bebop engine with ``draft_vocab_size=N`` (drafts among the heads'
  N most frequent tokens, ``draft_vocab.json``), e.g. ``bebop-v4096``, ``bebop-k1-v4096``
- ``...@<name>``        any bebop engine on the heads of ``--alt-heads <name>=<folder>`` instead of
  ``--heads`` (two heads side by side in one run), e.g. ``bebop@aux``, ``bebop-auto@aux``

vLLM's CPU temperature bug is fixed for all engines (the plugin's ``cpu_expand_fix`` patch is
process-wide), so the comparison is fair. Cells: temperature x batch size x domain. Batch 1
runs the domain's prompts one request at a time; batch B sends B requests in one
``generate`` call. Reported: output tokens/s (median over ``--repeats``), the ratio to
``none`` from the same cell, and mean accepted length (tokens per verify step, from vLLM's
per-request spec-decode metrics). Writes ``<out>.json`` and ``<out>.md``.

Example (the committed results):
    python benchmarks/bench_throughput.py --out benchmarks/results/throughput
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bebop_vllm.hardware import describe_machine_and_load, fast_engine_dtype, machine_info

ENGINES = ("none", "vllm-greedy", "vllm-prob", "bebop")
# bebop, bebop-k2, bebop-sync, bebop-k2-sync, bebop-entropy, bebop-v4096, bebop-k1-v4096-sync, ...
# bebop engines draft a fixed k unless named -auto (draft_length="auto", the plugin's default) or -entropy
BEBOP_ENGINE = re.compile(
    r"bebop(?:-k(?P<k>\d+))?(?P<entropy>-entropy)?(?P<auto>-auto)?(?:-v(?P<vocab>\d+))?(?P<sync>-sync)?"
    r"(?:@(?P<heads>\w+))?")


def heads_of(engine: str, heads: str, alt_heads: dict[str, str]) -> str:
    """The heads folder an engine runs: ``alt_heads[name]`` for ``...@name``, else ``heads``."""
    m = BEBOP_ENGINE.fullmatch(engine)
    return alt_heads[m["heads"]] if m and m["heads"] else heads


def _spec_config(engine: str, heads: str, k: int, policy: dict[str, Any] | None = None) -> dict[str, Any] | None:
    if engine == "none":
        return None
    m = BEBOP_ENGINE.fullmatch(engine)
    if m:
        spec: dict[str, Any] = {"method": "bebop", "model": heads, "num_speculative_tokens": int(m["k"] or k),
                                "draft_length": "auto" if m["auto"] else "fixed"}
        if m["entropy"]:
            if not policy:
                raise SystemExit(f"engine {engine} needs --acceptance-fit A,B")
            spec.update(draft_length="entropy", **policy)
        if m["vocab"]:
            spec["draft_vocab_size"] = int(m["vocab"])
        return spec
    return {"method": "eagle", "model": heads, "num_speculative_tokens": k,
            "draft_sample_method": "greedy" if engine == "vllm-greedy" else "probabilistic"}


def _worker(engine: str, model: str, heads: str, k: int, max_model_len: int, conn: Any,
            dtype: str = "auto", policy: dict[str, Any] | None = None, compiled: bool = False) -> None:
    """Holds one engine; answers ("run", prompts, params) with (seconds, tokens, accepted stats)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    if engine != "none":
        kwargs["per_request_spec_decode_metrics"] = "summary"
    if "-sync" in engine:
        kwargs["async_scheduling"] = False
    # enforce_eager=False is what `vllm serve` and LLM(...) give by default: on CPU vLLM 0.32 traces
    # the target once with Dynamo and compiles it with Inductor (CompilationMode.DYNAMO_TRACE_ONCE).
    llm = LLM(model=model, max_model_len=max_model_len, enforce_eager=not compiled, seed=0, dtype=dtype,
              speculative_config=_spec_config(engine, heads, k, policy), **kwargs)
    # Warm-up (first calls allocate / compile lazily).
    llm.generate(["Hello"], SamplingParams(max_tokens=4), use_tqdm=False)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        _, prompts, params, batch = msg
        sp = SamplingParams(**params)
        steps = accepted = tokens = 0
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            for out in llm.generate(prompts[i:i + batch], sp, use_tqdm=False):
                c = out.outputs[0]
                tokens += len(c.token_ids)
                m = getattr(c, "spec_decode_metrics", None)
                if m is not None and getattr(m, "histogram", None):
                    steps += sum(m.histogram)
                    accepted += sum(j * n for j, n in enumerate(m.histogram))
        conn.send((time.perf_counter() - t0, tokens, steps, accepted))


def _render_prompts(model: str, domains: list[str], per_domain: int, max_prompt_tokens: int) -> dict[str, list[str]]:
    """The first ``per_domain`` held-out prompts of each domain that fit ``max_prompt_tokens``."""
    from transformers import AutoTokenizer

    from bebop_vllm.data import load_prompts, render

    tok = AutoTokenizer.from_pretrained(model)
    out: dict[str, list[str]] = {}
    for d in domains:
        rendered = (render(p, tok) for p in load_prompts([d], split="heldout"))
        fitting = (r for r in rendered if len(tok(r, add_special_tokens=False).input_ids) <= max_prompt_tokens)
        out[d] = [r for _, r in zip(range(per_domain), fitting, strict=False)]
        if len(out[d]) < per_domain:
            raise SystemExit(f"domain {d}: only {len(out[d])} held-out prompts, need {per_domain}")
    return out


def interleaved_prompts(model: str, domains: list[str], count: int, max_prompt_tokens: int) -> list[str]:
    """``count`` held-out prompts, the domains taken in turn (math, code, agentic, math, ...)."""
    per_domain = -(-count // len(domains))
    by_domain = _render_prompts(model, domains, per_domain, max_prompt_tokens)
    return [by_domain[d][i] for i in range(per_domain) for d in domains][:count]


def _markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    engines = cfg["engines"]
    others = [e for e in engines if e != "none"]
    lines = [
        "# Throughput: no speculation vs vLLM's speculative path vs bebop",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {describe_machine_and_load(res['machine'])} (1/5/15-min load average when written: "
        f"{', '.join(f'{x:.1f}' for x in res['load_average_at_write'])}). "
        f"Model: {cfg['model']}. Heads: {cfg['heads']} ({cfg['heads_kind']})"
        + "".join(f"; engines @{n}: {f}" for n, f in (cfg.get("alt_heads") or {}).items()) + ". "
        f"k = {cfg['k']}, max_tokens = {cfg['max_tokens']}, prompts per domain = {cfg['prompts_per_domain']}, "
        f"repeats = {cfg['repeats']} (median), dtype = {cfg.get('dtype', 'auto')}, "
        f"{'compiled (vLLM default)' if cfg.get('compiled') else 'eager (enforce_eager=True)'}"
        + (f", entropy policy {cfg['entropy_policy']}" if cfg.get("entropy_policy") else "")
        + f". Wall time: {res['wall_s']:.0f} s."
        + ("" if res["complete"] else " **Partial run: not every cell finished.**"),
        "",
        "tokens/s (ratio to no speculation in the same cell) · mean accepted length (tokens per verify step)",
        "",
        "| T | batch | domain | " + " | ".join(engines) + " |",
        "|---|---|---|" + "---|" * len(engines),
    ]
    for cell in res["cells"]:
        row = [f"{cell['temperature']}", str(cell["batch"]), cell["domain"]]
        for e in engines:
            r = cell["engines"][e]
            s = f"{r['tok_s']:.1f}"
            if e != "none":
                ratio = "" if r["ratio"] is None else f" ({r['ratio']:.2f}x)"
                acc = "" if r["mean_accepted_len"] is None else f" · {r['mean_accepted_len']:.2f}"
                s += ratio + acc
            row.append(s)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Geometric-mean ratio to no speculation per (T, batch), over domains:", ""]
    lines += ["| T | batch | " + " | ".join(others) + " |", "|---|---|" + "---|" * len(others)]
    for key, ratios in res["summary"].items():
        t, b = key.split("|")
        lines.append(f"| {t} | {b} | " + " | ".join(f"{ratios[e]:.2f}x" for e in others) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bebop_vllm.paths import SHIPPED_HEADS_DIR, default_model_dir

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=str(default_model_dir()), help="target model folder (default model)")
    ap.add_argument("--heads", default=None, help="heads folder (default: shipped heads, else random heads)")
    ap.add_argument("--alt-heads", action="append", default=[], metavar="NAME=FOLDER",
                    help="another heads folder, run by the engines named ...@NAME (repeatable)")
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens for every speculative engine")
    ap.add_argument("--temperatures", default="0,0.7,1.0", help="comma-separated sampling temperatures")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--domains", default="math,code,agentic", help="comma-separated prompt domains")
    ap.add_argument("--prompts-per-domain", type=int, default=16, help="held-out prompts per domain")
    ap.add_argument("--batch1-prompts", type=int, default=2, help="prompts per domain for batch 1 (sequential)")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--repeats", type=int, default=1, help="repeat each cell; the median is reported")
    ap.add_argument("--max-model-len", type=int, default=1024, help="engine max_model_len")
    ap.add_argument("--engines", default=",".join(ENGINES), help="subset of engines to run")
    ap.add_argument("--out", default="benchmarks/results/throughput", help="output path prefix (.json/.md)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="engine compute dtype for every engine (auto: bf16 on CUDA or where the CPU has "
                         "avx512_bf16/AMX, float32 elsewhere, as the other benchmarks resolve it; the results "
                         "record the resolved dtype)")
    ap.add_argument("--compile", action="store_true",
                    help="run every engine as vLLM does by default (torch.compile of the target; "
                         "without this flag every engine is eager, enforce_eager=True)")
    ap.add_argument("--acceptance-fit", default=None,
                    help="A,B of alpha = A + B * entropy (nats) for engine bebop-entropy (from the acceptance study)")
    ap.add_argument("--draft-token-cost", type=float, default=0.1,
                    help="bebop-entropy: relative cost of one more draft token (default 0.1)")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in ENGINES and not BEBOP_ENGINE.fullmatch(e)]
    if bad:
        ap.error(f"unknown engine(s) {bad}; choose from {list(ENGINES)} or "
                 "bebop[-k<N>][-entropy|-auto][-v<N>][-sync][@NAME]")
    if any("=" not in a for a in args.alt_heads):
        ap.error(f"--alt-heads takes NAME=FOLDER, got {[a for a in args.alt_heads if '=' not in a]}")
    args.alt_heads = dict(a.split("=", 1) for a in args.alt_heads)
    named = [(e, m["heads"]) for e in engines if (m := BEBOP_ENGINE.fullmatch(e)) and m["heads"]]
    unnamed = [e for e, name in named if name not in args.alt_heads]
    if unnamed:
        ap.error(f"engine(s) {unnamed} name heads that no --alt-heads NAME=FOLDER gives")
    missing = [f for f in args.alt_heads.values() if not (Path(f) / "model.safetensors").is_file()]
    if missing:
        ap.error(f"--alt-heads folder(s) without model.safetensors: {missing}")
    policy = None
    if args.acceptance_fit:
        a, b = (float(x) for x in args.acceptance_fit.split(","))
        policy = {"acceptance_fit": [a, b], "draft_token_cost": args.draft_token_cost}
    args.entropy_policy = policy
    args.machine = machine_info()  # CPU model and flags, cores, versions; its load average is the run's start
    if args.dtype == "auto":  # vLLM's own "auto" is the model's bf16, emulated (slow) on AVX2-only CPUs
        args.dtype = fast_engine_dtype()  # recorded in the results' config
    needs_policy = [e for e in engines if (m := BEBOP_ENGINE.fullmatch(e)) and m["entropy"]]
    if needs_policy and policy is None:
        ap.error(f"engine(s) {needs_policy} need --acceptance-fit A,B")
    heads_kind = "given"
    heads = args.heads
    if heads is None:
        if (SHIPPED_HEADS_DIR / "model.safetensors").is_file():
            heads, heads_kind = str(SHIPPED_HEADS_DIR), "shipped"
        else:
            from bebop_vllm.heads import init_random_heads

            heads = str(init_random_heads(args.model, Path(args.out).parent / "_random_heads", num_depths=args.k))
            heads_kind = "random (untrained)"
    try:  # describe the heads by their metadata (loss "random-init" = untrained)
        meta = json.loads((Path(heads) / "bebop.json").read_text())
        heads_kind += f", loss={meta.get('loss')}, train_steps={meta.get('train_steps')}"
    except (OSError, ValueError):
        pass
    temps = [float(t) for t in args.temperatures.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    domains = args.domains.split(",")
    prompts = _render_prompts(args.model, domains, max(args.prompts_per_domain, args.batch1_prompts),
                              args.max_model_len - args.max_tokens - 8)

    t_start = time.perf_counter()
    ctx = mp.get_context("spawn")
    workers: dict[str, tuple[Any, Any]] = {}
    for e in engines:  # start one at a time: start-up is CPU-heavy
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, daemon=True,
                           args=(e, args.model, heads_of(e, heads, args.alt_heads), args.k, args.max_model_len,
                                 child, args.dtype, policy, args.compile))
        proc.start()
        print(f"starting engine {e} ...", file=sys.stderr, flush=True)
        if parent.recv() != "ready":
            raise SystemExit(f"engine {e} failed to start")
        workers[e] = (proc, parent)

    cells = []
    # Highest temperature first: the headline cell (T=1, batch 1) survives a run cut short.
    plan = [(t, b, d) for t in sorted(temps, reverse=True) for b in batches for d in domains]
    bar = tqdm(total=len(plan) * len(engines) * args.repeats, desc="cells x engines", unit="run")
    for n_cell, (t, b, d) in enumerate(plan):
        ps = prompts[d][: args.batch1_prompts] if b == 1 else prompts[d][: args.prompts_per_domain]
        params = {"temperature": t, "max_tokens": args.max_tokens, "ignore_eos": True}
        runs: dict[str, list[tuple[float, int, int, int]]] = {e: [] for e in engines}
        for rep in range(args.repeats):
            order = engines[(n_cell + rep) % len(engines):] + engines[: (n_cell + rep) % len(engines)]
            for e in order:
                workers[e][1].send(("run", ps, params, b))
                runs[e].append(workers[e][1].recv())
                bar.update(1)
        cell = {"temperature": t, "batch": b, "domain": d, "num_prompts": len(ps), "engines": {}}
        for e in engines:
            tok_s = statistics.median(tok / sec for sec, tok, _, _ in runs[e])
            steps = sum(r[2] for r in runs[e])
            acc = sum(r[3] for r in runs[e])
            cell["engines"][e] = {
                "tok_s": tok_s,
                "runs": [{"seconds": s, "tokens": n, "verify_steps": st, "accepted": a} for s, n, st, a in runs[e]],
                "mean_accepted_len": (1 + acc / steps) if steps else None,
            }
        base = cell["engines"].get("none", {}).get("tok_s")
        for e in engines:
            cell["engines"][e]["ratio"] = cell["engines"][e]["tok_s"] / base if base else None
        cells.append(cell)
        bar.set_postfix_str(f"T={t} b={b} {d}: " + " ".join(
            f"{e}={cell['engines'][e]['tok_s']:.0f}" for e in engines))
        # Partial results after every cell: a long run cut short still leaves its data.
        _write(args, argv, heads, heads_kind, engines, temps, batches, cells, t_start, len(plan))
    bar.close()
    for proc, conn in workers.values():
        conn.send(("stop",))
        proc.join(timeout=60)
    _write(args, argv, heads, heads_kind, engines, temps, batches, cells, t_start, len(plan))
    return 0


def _write(args: Any, argv: list[str] | None, heads: str, heads_kind: str, engines: list[str], temps: list[float],
           batches: list[int], cells: list[dict[str, Any]], t_start: float, planned: int) -> None:
    summary: dict[str, dict[str, float]] = {}
    if "none" in engines:
        for t in temps:
            for b in batches:
                sel = [c for c in cells if c["temperature"] == t and c["batch"] == b]
                if not sel:
                    continue
                summary[f"{t}|{b}"] = {
                    e: statistics.geometric_mean([c["engines"][e]["ratio"] for c in sel])
                    for e in engines
                    if e != "none"
                }
    res = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": args.machine,  # machine_info() before the engines started
        # Other processes on the machine make tokens/s noisy: record the load it ran under.
        "load_average_at_write": list(os.getloadavg()),
        "config": {"model": args.model, "heads": heads, "heads_kind": heads_kind, "alt_heads": args.alt_heads,
                   "k": args.k,
                   "max_tokens": args.max_tokens, "prompts_per_domain": args.prompts_per_domain,
                   "batch1_prompts": args.batch1_prompts, "repeats": args.repeats, "engines": engines,
                   "dtype": args.dtype, "entropy_policy": args.entropy_policy,
                   "compiled": args.compile},
        "wall_s": time.perf_counter() - t_start,
        "complete": len(cells) == planned,
        "cells": cells,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(res))


if __name__ == "__main__":
    raise SystemExit(main())
