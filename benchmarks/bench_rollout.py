"""Rollout benchmark: is bebop ever slower than plain decoding, and how much faster is an RL rollout?

Three engines, each held in its own process for the whole run so every ratio comes from one run:

- ``none``        no speculation (plain decoding)
- ``bebop``       method "bebop", a fixed k drafts per step (``draft_length="fixed"``)
- ``bebop-auto``  method "bebop" with the plugin's default config (``draft_length="auto"``: per
  request and step 0..k drafts from the step-cost model and the request's acceptance)

(a) **Concurrency sweep**: for every temperature and concurrency c (default 1, 2, 4, 8, 16, 32,
    64), c held-out prompts are submitted at once (``ignore_eos``, ``--sweep-max-tokens``) and
    tokens/s is measured per engine (median of ``--repeats`` runs); ratio = engine tokens/s / plain
    tokens/s in the same cell.
    The engines take turns per cell (rotating order), so machine load hits all of them alike.
    Every run starts from an empty prefix cache (fresh prompts, as in an RL step).
(b) **RL-shaped rollout**: ``--rollout-prompts`` held-out prompts x ``--rollout-samples`` samples
    (T = ``--rollout-temperature``, ``--rollout-max-tokens``, natural stops: long-tailed lengths)
    submitted at once; the wall time until the last sequence ends, plain vs bebop-auto (and
    bebop fixed when ``--rollout-engines`` says so).

Writes ``OUT.json`` (every number, the command, the machine with its CPU flags), ``OUT.md`` and
``OUT.png`` (speedup vs concurrency per temperature). ``--quick`` is a smoke run (minutes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import _render_prompts, _spec_config  # noqa: E402

ENGINES = ("none", "bebop", "bebop-auto")
DEFAULT_CONCURRENCY = "1,2,4,8,16,32,64"


def parse_engine(name: str) -> tuple[str, int | None]:
    """``ENGINE`` or ``ENGINE:bN`` (the same engine with N-token KV cache blocks, so block sizes
    can be compared side by side in one run) -> (engine, block size or None)."""
    base, _, suffix = name.partition(":")
    if base not in ENGINES or (suffix and not (suffix[:1] == "b" and suffix[1:].isdigit())):
        raise ValueError(f"unknown engine {name!r}; choose from {ENGINES}, optionally with ':bN' (N-token KV blocks)")
    return base, int(suffix[1:]) if suffix else None


def in_turn(engines: list[str], turn: int) -> list[str]:
    """``engines`` rotated by ``turn``: runs alternate their order, so machine load hits all alike."""
    shift = turn % len(engines)
    return engines[shift:] + engines[:shift]


def _worker(engine: str, model: str, heads: str, k: int, max_model_len: int, max_num_seqs: int, dtype: str,
            enforce_eager: bool, conn: Any, block_size: int | None = None, prefix_caching: bool = True) -> None:
    """Holds one engine; answers ("run", prompts, params) with per-run totals."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    engine, own_block_size = parse_engine(engine)
    block_size = own_block_size or block_size
    spec = _spec_config(engine, heads, k)
    kwargs: dict[str, Any] = {"per_request_spec_decode_metrics": "summary"} if spec else {}
    if block_size:
        kwargs["block_size"] = block_size
    if not prefix_caching:
        kwargs["enable_prefix_caching"] = False
    llm = LLM(model=model, max_model_len=max_model_len, enforce_eager=enforce_eager, seed=0, dtype=dtype,
              max_num_seqs=max_num_seqs, speculative_config=spec, **kwargs)
    llm.generate(["Hello"] * 4, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        _, prompts, params = msg
        # Every run starts from an empty prefix cache, as an RL step's fresh prompts do: the sweep
        # repeats its prompts in every cell, and a plain engine reuses more of a cached prompt
        # than an EAGLE-style one (vLLM drops the last cached block for the drafter to recompute).
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
        seconds = time.perf_counter() - t0
        lengths, drafted, accepted, steps = [], 0, 0, 0
        for out in outs:
            for c in out.outputs:
                lengths.append(len(c.token_ids))
                m = getattr(c, "spec_decode_metrics", None)
                if m is not None:
                    drafted += int(getattr(m, "num_draft_tokens", 0) or 0)
                    hist = getattr(m, "histogram", None) or []
                    steps += sum(hist)
                    accepted += sum(j * n for j, n in enumerate(hist))
        conn.send({"seconds": seconds, "tokens": sum(lengths), "lengths": lengths, "drafted": drafted,
                   "verify_steps": steps, "accepted": accepted})


def _summarise(run: dict[str, Any]) -> dict[str, Any]:
    steps = run["verify_steps"]
    return {"seconds": run["seconds"], "tokens": run["tokens"], "tok_s": run["tokens"] / run["seconds"],
            "drafted_per_token": run["drafted"] / max(run["tokens"], 1),
            "mean_accepted_len": (1 + run["accepted"] / steps) if steps else None}


def _summarise_repeats(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the repeats; tok/s is the median of the runs' tok/s (each run's is kept)."""
    total = {k: sum(r[k] for r in raws) for k in ("seconds", "tokens", "drafted", "verify_steps", "accepted")}
    out = _summarise(total)
    out["tok_s_runs"] = [r["tokens"] / r["seconds"] for r in raws]
    out["tok_s"] = statistics.median(out["tok_s_runs"])
    return out


def concurrency_profile(lengths: list[int]) -> list[int]:
    """Requests still decoding at each decode step of a rollout whose requests all start together.

    ``lengths [N]`` output lengths -> ``running [max(lengths)]``, ``running[s]`` = how many requests
    emit their (s+1)-th token at step s (plain decoding: one token per request and step).
    """
    longest = max(lengths, default=0)
    ends = [0] * (longest + 1)
    for n in lengths:
        ends[n] += 1
    running, alive = [], len(lengths) - ends[0]
    for s in range(longest):
        running.append(alive)
        alive -= ends[s + 1]
    return running


def _interp_log2(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear in log2(x) through (xs, ys), clamped at both ends."""
    import math

    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = next(i for i in range(1, len(xs)) if x <= xs[i])
    w = (math.log2(x) - math.log2(xs[i - 1])) / (math.log2(xs[i]) - math.log2(xs[i - 1]))
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


def tail_model(lengths: list[int], sweep: list[dict[str, Any]], temperature: float,
               engine: str = "bebop-auto") -> dict[str, Any] | None:
    """What the concurrency sweep says a rollout with these output lengths can gain from ``engine``.

    A decode step with c requests in flight costs c / (plain tokens/s at c) and runs ``ratio(c)``
    times faster with the engine (both piecewise-linear in log2 c over the sweep's cells at
    ``temperature``; beyond the sweep's largest c its values are used, which overstates plain
    step time there - throughput still grows - and so the weight of the crowded phase). Returns the
    modelled plain and engine decode seconds, ``bound`` = their ratio (the speedup this length
    profile allows on this machine), and the share of plain decode time spent at c <= 4 / <= 16.
    None when the sweep has no cell at ``temperature`` with both engines.
    """
    cells = sorted((c for c in sweep if c["temperature"] == temperature
                    and "none" in c["engines"] and engine in c["engines"]), key=lambda c: c["concurrency"])
    if not cells:
        return None
    cs = [float(c["concurrency"]) for c in cells]
    tok_s = [c["engines"]["none"]["tok_s"] for c in cells]
    ratio = [c["engines"][engine]["ratio"] for c in cells]
    plain = engine_s = small4 = small16 = 0.0
    for c in concurrency_profile(lengths):
        if c == 0:
            continue
        step = c / _interp_log2(c, cs, tok_s)
        plain += step
        engine_s += step / _interp_log2(c, cs, ratio)
        small4 += step if c <= 4 else 0.0
        small16 += step if c <= 16 else 0.0
    return {"engine": engine, "temperature": temperature, "sweep_max_concurrency": int(cs[-1]),
            "plain_decode_s": plain, "engine_decode_s": engine_s, "bound": plain / engine_s if engine_s else None,
            "share_c_le_4": small4 / plain if plain else 0.0, "share_c_le_16": small16 / plain if plain else 0.0}


def _markdown(res: dict[str, Any]) -> str:
    from bebop_vllm.hardware import describe_machine_and_load

    cfg, m = res["config"], res["machine"]
    lines = ["# Rollout benchmark: plain decoding vs bebop fixed k vs bebop auto", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {describe_machine_and_load(m)}. "
             f"Model: {cfg['model']} ({cfg['dtype']}). Heads: {cfg['heads']}. k = {cfg['k']}. "
             + {True: "Eager engines (enforce_eager). ", False: "vLLM's default engines (compiled / CUDA graphs). ",
                None: ""}[cfg.get("eager")] +
             f"Wall time: {res['wall_s']:.0f} s." + ("" if cfg.get("prefix_caching", True) else
                                                      " Prefix caching off in every engine.")
             + ("" if res["complete"] else " **Partial run.**"), ""]
    if res["sweep"]:
        engines = cfg["engines"]
        lines += [f"## (a) Concurrency sweep ({cfg['sweep_max_tokens']} tokens per request, ignore_eos)", "",
                  f"tokens/s, median of {cfg.get('repeats', 1)} runs (ratio to plain in the same cell) · drafts per "
                  "emitted token", "",
                  "| T | concurrency | " + " | ".join(engines) + " |", "|---|---|" + "---|" * len(engines)]
        for cell in res["sweep"]:
            row = [str(cell["temperature"]), str(cell["concurrency"])]
            for e in engines:
                r = cell["engines"][e]
                s = f"{r['tok_s']:.1f}"
                if e != "none":
                    s += f" ({r['ratio']:.2f}x) · {r['drafted_per_token']:.2f}"
                row.append(s)
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Minimum ratio to plain over concurrencies: " + "; ".join(
            f"T={t} {e} {v:.2f}x" for t, per in res["min_ratio"].items() for e, v in per.items()), ""]
    if res["rollout"]:
        r = res["rollout"]
        lines += [f"## (b) RL-shaped rollout: {r['prompts']} prompts x {r['samples']} samples, T = {r['temperature']}, "
                  f"max_tokens {r['max_tokens']}, natural stops; median of {r.get('repeats', 1)} run(s) per engine, "
                  "engines alternating", "",
                  "| engine | wall s (last sequence done; every run) | tokens | speedup vs plain | drafts per token | "
                  "length p50 / p90 / max |", "|---|---|---|---|---|---|"]
        for e, v in r["engines"].items():
            ls = sorted(v["lengths"])
            pct = (f"{ls[len(ls) // 2]} / {ls[int(len(ls) * 0.9)]} / {ls[-1]}" if ls else "-")
            sp = "" if v.get("speedup") is None else f"{v['speedup']:.2f}x"
            runs = ", ".join(f"{x:.1f}" for x in v.get("seconds_runs", [v["seconds"]]))
            lines.append(f"| {e} | {v['seconds']:.1f} ({runs}) | {v['tokens']} | {sp} | "
                         f"{v['drafted_per_token']:.2f} | {pct} |")
        tm = r.get("tail_model")
        if tm:
            src = r.get("tail_model_sweep") or "this run's sweep"
            lines += ["", f"**Tail model** (plain run's lengths, sweep from {src}, T = {tm['temperature']}): "
                      f"{100 * tm['share_c_le_4']:.0f} % of plain decode time is spent with <= 4 requests in "
                      f"flight and {100 * tm['share_c_le_16']:.0f} % with <= 16; if every step ran at the sweep's "
                      f"{tm['engine']} ratio for its concurrency, this rollout would run **{tm['bound']:.2f}x** "
                      f"plain (modelled decode time {tm['plain_decode_s']:.0f} s vs {tm['engine_decode_s']:.0f} s; "
                      f"beyond the sweep's {tm['sweep_max_concurrency']} requests its largest cell is used). "
                      "Speculation pays only in the tail; a rollout whose requests mostly run to max_tokens "
                      "together has none."]
    return "\n".join(lines) + "\n"


def _plot(res: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in sorted({c["temperature"] for c in res["sweep"]}, reverse=True):
        cells = [c for c in res["sweep"] if c["temperature"] == t]
        xs = [c["concurrency"] for c in cells]
        for e, style in (("bebop", "--"), ("bebop-auto", "-")):
            if cells and e in cells[0]["engines"]:
                ax.plot(xs, [c["engines"][e]["ratio"] for c in cells], style, marker="o", label=f"{e} T={t}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(0.97, color="red", lw=0.6, ls=":", label="0.97x goal")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in flight (concurrency)")
    ax.set_ylabel("tokens/s ratio to plain decoding")
    ax.set_title("bebop speedup vs concurrency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from bebop_vllm.hardware import machine_info
    from bebop_vllm.paths import SHIPPED_HEADS_DIR, default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=str(default_model_dir()), help="target model folder (default model)")
    ap.add_argument("--heads", default=str(SHIPPED_HEADS_DIR), help="heads folder (default: the shipped heads)")
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens of both bebop engines (default 3)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="engine dtype (auto: bfloat16 on CUDA or CPUs with bf16 instructions, else float32)")
    ap.add_argument("--max-model-len", type=int, default=1024, help="engine max_model_len (default 1024)")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="engine max_num_seqs (default 256)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="do not pass enforce_eager: vLLM's default (CUDA graphs on GPU; on CPU the target is "
                         "compiled with torch.compile, as `vllm serve` and LLM(...) run it)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV cache block size of every engine (default: the engine's own; on CPU 128 for plain "
                         "decoding, 32 for bebop engines). An EAGLE-style engine reuses a cached prompt one block "
                         "short, so smaller blocks keep more of the samples' sharing")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="every engine without prefix caching: the rollout's samples of one prompt then share "
                         "nothing (vLLM's EAGLE-style engines reuse a cached prompt one KV block short, so "
                         "this separates that from the speculation itself)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"sweep engines (default {','.join(ENGINES)}); ENGINE:bN runs ENGINE with N-token KV blocks "
                         "(e.g. bebop-auto:b128), to compare block sizes in one run")
    ap.add_argument("--domains", default="math,code,agentic", help="held-out prompt domains, mixed round-robin")
    ap.add_argument("--concurrency", default=DEFAULT_CONCURRENCY,
                    help=f"sweep concurrencies (default {DEFAULT_CONCURRENCY})")
    ap.add_argument("--temperatures", default="1.0,0.7", help="sweep temperatures (default 1.0,0.7)")
    ap.add_argument("--sweep-max-tokens", type=int, default=64,
                    help="tokens per sweep request (ignore_eos; default 64)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="sweep: runs per engine and cell, median tokens/s (default 2)")
    ap.add_argument("--skip-sweep", action="store_true", help="run only the rollout (b)")
    ap.add_argument("--skip-rollout", action="store_true", help="run only the sweep (a)")
    ap.add_argument("--rollout-prompts", type=int, default=64, help="rollout: held-out prompts (default 64)")
    ap.add_argument("--rollout-samples", type=int, default=4, help="rollout: samples per prompt (default 4)")
    ap.add_argument("--rollout-max-tokens", type=int, default=512, help="rollout: max_tokens (default 512)")
    ap.add_argument("--rollout-temperature", type=float, default=1.0, help="rollout: temperature (default 1.0)")
    ap.add_argument("--rollout-engines", default="none,bebop-auto",
                    help="rollout engines (default none,bebop-auto; add bebop for fixed k; ENGINE:bN as for --engines)")
    ap.add_argument("--rollout-repeats", type=int, default=1,
                    help="rollout: runs per engine, engines alternating, median wall time (default 1)")
    ap.add_argument("--sweep-from", default=None,
                    help="a previous run's OUT.json whose sweep feeds the rollout's tail model when this run has "
                         "no sweep at the rollout temperature (e.g. with --skip-sweep)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: concurrency 1,4,16 at T=1, 16 tokens; rollout 8 prompts x 2 samples, 64 tokens")
    ap.add_argument("--out", default="benchmarks/results/rollout", help="output prefix for .json/.md/.png")
    args = ap.parse_args(argv)
    if args.sweep_from and not Path(args.sweep_from).is_file():
        ap.error(f"--sweep-from {args.sweep_from}: no such file (expected a bench_rollout OUT.json with a sweep)")
    if args.quick:
        args.concurrency, args.temperatures, args.sweep_max_tokens = "1,4,16", "1.0", 16
        args.rollout_prompts, args.rollout_samples, args.rollout_max_tokens = 8, 2, 64
    if args.dtype == "auto":
        from bebop_vllm.hardware import fast_engine_dtype

        args.dtype = fast_engine_dtype()  # recorded in the results' config
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    sweep_engines = [e for e in args.engines.split(",") if e] if not args.skip_sweep else []
    rollout_engines = [e for e in args.rollout_engines.split(",") if e] if not args.skip_rollout else []
    for e in {*sweep_engines, *rollout_engines}:
        try:
            parse_engine(e)
        except ValueError as exc:
            ap.error(str(exc))
    engines = list(dict.fromkeys([*sweep_engines, *rollout_engines]))
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    domains = args.domains.split(",")
    need = max([*concurrencies, 0] if sweep_engines else [0]) + (args.rollout_prompts if rollout_engines else 0)
    max_prompt_tokens = args.max_model_len - args.rollout_max_tokens - 8
    try:
        per_domain = -(-need // len(domains))
        by_domain = _render_prompts(args.model, domains, per_domain, max_prompt_tokens)
    except SystemExit as exc:  # not enough held-out prompts for disjoint sets: the rollout reuses sweep prompts
        need = max([*concurrencies, 0] if sweep_engines else [0]) if not rollout_engines else \
            max(max(concurrencies) if sweep_engines else 0, args.rollout_prompts)
        print(f"{exc}; the rollout's prompts overlap the sweep's ({need} prompts in all)", file=sys.stderr)
        per_domain = -(-need // len(domains))
        by_domain = _render_prompts(args.model, domains, per_domain, max_prompt_tokens)
    mixed = [by_domain[d][i] for i in range(per_domain) for d in domains]
    sweep_prompts = mixed[: max(concurrencies)]
    rollout_prompts = mixed[len(mixed) - args.rollout_prompts:]  # disjoint from the sweep when enough prompts

    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    res: dict[str, Any] = {"command": command, "machine": machine_info(), "sweep": [], "min_ratio": {}, "rollout": None,
                           "config": {"model": args.model, "heads": args.heads, "k": args.k, "dtype": args.dtype,
                                      "eager": not args.cuda_graphs,
                                      "engines": sweep_engines, "sweep_max_tokens": args.sweep_max_tokens,
                                      "repeats": args.repeats, "block_size": args.block_size,
                                      "max_num_seqs": args.max_num_seqs, "quick": args.quick,
                                      "prefix_caching": not args.no_prefix_caching}}
    t_start = time.perf_counter()
    planned = len(temps) * len(concurrencies) * bool(sweep_engines) + bool(rollout_engines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(done: int) -> None:
        res["wall_s"] = time.perf_counter() - t_start
        res["complete"] = done == planned
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(_markdown(res))
        if res["sweep"]:
            _plot(res, out.with_suffix(".png"))

    ctx = mp.get_context("spawn")
    workers: dict[str, tuple[Any, Any]] = {}
    for e in engines:  # one at a time: start-up is CPU-heavy
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, daemon=True,
                           args=(e, args.model, args.heads, args.k, args.max_model_len, args.max_num_seqs, args.dtype,
                                 not args.cuda_graphs, child, args.block_size, not args.no_prefix_caching))
        proc.start()
        print(f"starting engine {e} ...", file=sys.stderr, flush=True)
        if parent.recv() != "ready":
            raise SystemExit(f"engine {e} failed to start")
        workers[e] = (proc, parent)

    def run(e: str, prompts: list[str], params: dict[str, Any]) -> dict[str, Any]:
        workers[e][1].send(("run", prompts, params))
        return workers[e][1].recv()

    done = 0
    for t in temps if sweep_engines else []:
        for n_cell, c in enumerate(concurrencies):
            params = {"temperature": t, "max_tokens": args.sweep_max_tokens, "ignore_eos": True}
            raws: dict[str, list[dict[str, Any]]] = {e: [] for e in sweep_engines}
            for rep in range(args.repeats):  # engines take turns, in a rotating order
                for e in in_turn(sweep_engines, n_cell + rep):
                    raws[e].append(run(e, sweep_prompts[:c], params))
            cell = {"temperature": t, "concurrency": c, "engines": {e: _summarise_repeats(raws[e])
                                                                    for e in sweep_engines}}
            base = cell["engines"].get("none", {}).get("tok_s")
            for e in sweep_engines:
                cell["engines"][e]["ratio"] = cell["engines"][e]["tok_s"] / base if base else None
            res["sweep"].append(cell)
            print(f"T={t} c={c}: " + " ".join(f"{e}={cell['engines'][e]['tok_s']:.1f}" for e in sweep_engines),
                  file=sys.stderr, flush=True)
            done += 1
            write(done)
        res["min_ratio"][str(t)] = {e: min(c["engines"][e]["ratio"] for c in res["sweep"] if c["temperature"] == t)
                                    for e in sweep_engines if e != "none" and "none" in sweep_engines}
    if rollout_engines:
        prompts = [p for p in rollout_prompts for _ in range(args.rollout_samples)]
        params = {"temperature": args.rollout_temperature, "max_tokens": args.rollout_max_tokens}
        r = {"prompts": args.rollout_prompts, "samples": args.rollout_samples, "temperature": args.rollout_temperature,
             "max_tokens": args.rollout_max_tokens, "repeats": args.rollout_repeats, "engines": {}}
        rollout_raws: dict[str, list[dict[str, Any]]] = {e: [] for e in rollout_engines}
        for rep in range(args.rollout_repeats):  # engines take turns, in a rotating order
            for e in in_turn(rollout_engines, rep):
                rollout_raws[e].append(run(e, prompts, params))
                print(f"rollout {e}: {rollout_raws[e][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
        for e, raws in rollout_raws.items():
            median_run = sorted(raws, key=lambda x: x["seconds"])[(len(raws) - 1) // 2]
            r["engines"][e] = {**_summarise(median_run), "lengths": median_run["lengths"],
                               "seconds_runs": [x["seconds"] for x in raws]}
        base = r["engines"].get("none", {}).get("seconds")
        for v in r["engines"].values():
            v["speedup"] = base / v["seconds"] if base else None
        tail_sweep, r["tail_model_sweep"] = res["sweep"], None
        if args.sweep_from and not any(c["temperature"] == args.rollout_temperature for c in res["sweep"]):
            tail_sweep = json.loads(Path(args.sweep_from).read_text())["sweep"]
            r["tail_model_sweep"] = args.sweep_from
        if "none" in r["engines"]:
            r["tail_model"] = tail_model(r["engines"]["none"]["lengths"], tail_sweep, args.rollout_temperature)
        res["rollout"] = r
        done += 1
    write(done)
    for proc, conn in workers.values():
        conn.send(("stop",))
        proc.join(timeout=60)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
