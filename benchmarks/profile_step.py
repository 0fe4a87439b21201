"""Where does a decode step's time go? cProfile of one engine decoding a batch, in-process.

Runs one engine (``none``, ``bebop`` fixed k, ``bebop-auto``, or ``bebop-off``: auto with a
draft_min_gain no batch can reach, so it never drafts; the step every crowded batch gets) with
the engine core and the worker in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), submits
``--batch`` prompts (``ignore_eos``, ``--tokens`` each) after a warm-up, and profiles only the
timed generate. Prints and writes the functions with the most own time and the vLLM / bebop
functions with the most cumulative time, and the per-step wall time (generate seconds / engine
steps), so two engines' steps can be compared line by line:

    python benchmarks/profile_step.py --engine none --batch 16
    python benchmarks/profile_step.py --engine bebop-off --batch 16

``--timers`` replaces cProfile by wall-clock timers around the step's parts (engine step, target
forward and logits, sampler or verifier, the drafter's propose, its forward passes, draft logits and
draft sampling): no profiler overhead, so the parts add up to the real step time (cProfile inflates
Python-heavy parts, such as the drafter's bookkeeping, several-fold):

    python benchmarks/profile_step.py --engine bebop --batch 1 --tokens 128 --compile --timers

Results: ``benchmarks/results/profile/<engine>_b<batch>[_<label>].txt`` (``--no-save`` to print only).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ENGINES = ("none", "bebop", "bebop-auto", "bebop-off")
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "profile"


def spec_config(engine: str, heads: str, k: int) -> dict[str, Any] | None:
    if engine == "none":
        return None
    spec: dict[str, Any] = {"method": "bebop", "model": heads, "num_speculative_tokens": k,
                            "draft_length": "fixed" if engine == "bebop" else "auto"}
    if engine == "bebop-off":
        spec["draft_min_gain"] = 1.0  # the largest margin: drafting must double tokens/s
    return spec


def time_parts(engine_core: Any) -> tuple[dict[str, float], dict[str, int]]:
    """Wrap the step's parts (instance attributes, so only this engine is touched) with wall-clock
    timers; returns (seconds, calls) per part, filled as the engine runs. Parts nest: the drafter's
    forward, logits and sampling are inside ``drafter.propose``, which is inside the runner's
    ``sample_tokens``."""
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    runner = engine_core.model_executor.driver_worker.worker.model_runner

    def wrap(obj: Any, attr: str, label: str) -> None:
        inner = getattr(obj, attr)
        seconds[label], calls[label] = 0.0, 0  # the table lists parts in this (nesting) order

        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                seconds[label] += time.perf_counter() - t
                calls[label] += 1

        setattr(obj, attr, timed)

    wrap(engine_core.scheduler, "schedule", "scheduler.schedule")
    wrap(engine_core.scheduler, "update_from_output", "scheduler.update_from_output")
    wrap(runner, "execute_model", "runner.execute_model (target)")
    wrap(runner.model, "forward", "  target forward")
    wrap(runner.model, "compute_logits", "  target compute_logits")
    wrap(runner, "sample_tokens", "runner.sample_tokens")
    drafter = getattr(runner, "drafter", None)
    if drafter is None:
        wrap(runner.sampler, "forward", "  sampler")
    else:
        wrap(runner.rejection_sampler, "forward", "  verifier (bonus sampler + rejection)")
        wrap(drafter, "propose", "  drafter.propose")
        wrap(drafter.model, "forward", "    draft forward passes")
        wrap(drafter.model, "compute_logits", "    draft logits")
        wrap(drafter, "_sample_from_logits", "    draft sampling")
    return seconds, calls


def report_timers(args: argparse.Namespace, llm: Any, engine_core: Any, prompts: list[str], params: Any,
                  step_log: list[tuple[int, float]], machine: dict[str, Any], command: str, dtype: str) -> int:
    """The ``--timers`` run: one timed generate with the parts wrapped; a table of ms per step."""
    from bebop_vllm.hardware import describe_machine_and_load

    seconds, calls = time_parts(engine_core)
    step_log.clear()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    steps = max(len(step_log), 1)
    decode = sorted(dt for n, dt in step_log if 0 < n <= args.batch * (args.k + 1))
    lines = [f"engine {args.engine}, batch {args.batch}, {args.tokens} tokens each, T = {args.temperature}, "
             f"dtype {dtype}, {'compiled' if args.compile else 'eager'}; wall-clock timers (no profiler)",
             f"command: {command}",
             describe_machine_and_load(machine),
             f"generate {wall:.3f} s, {tokens} tokens, {tokens / wall:.1f} tok/s, {len(step_log)} engine steps "
             f"({1000 * wall / steps:.2f} ms each); decode steps: {len(decode)}, median "
             f"{1000 * decode[len(decode) // 2] if decode else 0:.2f} ms", "",
             "| part | ms per engine step | calls | ms per call |", "|---|---|---|---|",
             f"| engine step (all) | {1000 * sum(dt for _, dt in step_log) / steps:.2f} | {len(step_log)} | |"]
    for label in seconds:  # insertion order = nesting order of time_parts
        lines.append(f"| {label.replace('  ', '· ')} | {1000 * seconds[label] / steps:.2f} | {calls[label]} | "
                     f"{1000 * seconds[label] / max(calls[label], 1):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        label = "_".join(x for x in ("timers", args.label) if x)
        (RESULTS_DIR / f"{args.engine}_b{args.batch}_{label}.txt").write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    from bebop_vllm.hardware import describe_machine_and_load, fast_engine_dtype, machine_info
    from bebop_vllm.paths import SHIPPED_HEADS_DIR, default_model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--engine", default="bebop-off", choices=ENGINES, help="engine to profile (default bebop-off)")
    ap.add_argument("--batch", type=int, default=16, help="prompts decoded together (default 16)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per prompt, ignore_eos (default 64)")
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens (default 3)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    ap.add_argument("--model", default=str(default_model_dir()), help="target model folder (default model)")
    ap.add_argument("--heads", default=str(SHIPPED_HEADS_DIR), help="heads folder (default: shipped heads)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="engine dtype (auto: from the CPU flags)")
    ap.add_argument("--compile", action="store_true",
                    help="compile the target as vLLM does by default (without it: enforce_eager=True)")
    ap.add_argument("--top", type=int, default=45, help="lines per table (default 45)")
    ap.add_argument("--label", default="", help="suffix of the results file, e.g. before / after a change")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--dump", default=None, help="also write the raw cProfile stats here (for pstats / snakeviz)")
    ap.add_argument("--timers", action="store_true",
                    help="wall-clock timers around the step's parts instead of cProfile (no profiler overhead)")
    args = ap.parse_args(argv)
    machine = machine_info()  # before the engine starts: its load average is the machine's, not ours
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    dtype = fast_engine_dtype() if args.dtype == "auto" else args.dtype
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench_throughput import interleaved_prompts
    from vllm import LLM, SamplingParams

    spec = spec_config(args.engine, args.heads, args.k)
    kwargs: dict[str, Any] = {"per_request_spec_decode_metrics": "summary"} if spec else {}
    llm = LLM(model=args.model, max_model_len=1024, enforce_eager=not args.compile, seed=0, dtype=dtype,
              max_num_seqs=max(args.batch, 8), speculative_config=spec, **kwargs)
    prompts = interleaved_prompts(args.model, ["math", "code", "agentic"], args.batch, 400)
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=args.temperature, seed=None)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up (and the step-cost calibration)

    # Per-step wall time and scheduled tokens (EngineCore.step_fn is what InprocClient.get_output
    # calls), so the prefill step can be told from the decode steps.
    engine_core = llm.llm_engine.engine_core.engine_core
    step_log: list[tuple[int, float]] = []
    step_fn, schedule = engine_core.step_fn, engine_core.scheduler.schedule
    scheduled = {"tokens": 0}

    def logged_schedule(*a: Any, **kw: Any) -> Any:
        out = schedule(*a, **kw)
        scheduled["tokens"] = out.total_num_scheduled_tokens
        return out

    def timed_step() -> Any:
        t = time.perf_counter()
        out = step_fn()
        step_log.append((scheduled["tokens"], time.perf_counter() - t))
        return out

    engine_core.step_fn, engine_core.scheduler.schedule = timed_step, logged_schedule
    if args.timers:
        return report_timers(args, llm, engine_core, prompts, params, step_log, machine, command, dtype)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    outs = llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)

    stats = pstats.Stats(prof)
    if args.dump:
        stats.dump_stats(args.dump)
    # Engine steps = calls of EngineCore.step (vllm/v1/engine/core.py).
    n_steps = sum(v[1] for (path, _, name), v in stats.stats.items()  # type: ignore[attr-defined]
                  if name in ("step", "step_with_batch_queue") and path.endswith("v1/engine/core.py"))
    decode = sorted(dt for n, dt in step_log if n <= args.batch * (args.k + 1) and n > 0)
    prefill = [(n, dt) for n, dt in step_log if n > args.batch * (args.k + 1)]
    buf = io.StringIO()
    header = (f"engine {args.engine}, batch {args.batch}, {args.tokens} tokens each, T = {args.temperature}, "
              f"dtype {dtype}, {'compiled' if args.compile else 'eager'}\ncommand: {command}\n"
              f"{describe_machine_and_load(machine)}\n"
              f"generate {seconds:.3f} s, {tokens} tokens, {tokens / seconds:.1f} tok/s, {n_steps} engine steps, "
              f"{1000 * seconds / max(n_steps, 1):.2f} ms per step (profiler overhead included)\n"
              f"prefill steps (tokens, ms): {[(n, round(1000 * dt, 1)) for n, dt in prefill]}; "
              f"decode steps: {len(decode)}, median {1000 * decode[len(decode) // 2] if decode else 0:.2f} ms\n")
    buf.write(header)
    stats.stream = buf  # type: ignore[attr-defined]
    buf.write("\n== own time ==\n")
    stats.sort_stats("tottime").print_stats(args.top)
    buf.write("\n== cumulative, vllm and bebop functions ==\n")
    stats.sort_stats("cumulative").print_stats(r"vllm|bebop", args.top)
    text = buf.getvalue()
    print(text)
    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{args.engine}_b{args.batch}{'_' + args.label if args.label else ''}.txt").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
