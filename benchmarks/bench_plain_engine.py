"""Benchmark: a plain engine (no speculation) with bebop-vllm installed vs with it excluded.

bebop must not cost engines that do not use it. Both arms run the same plain vLLM engine on the
default model, the same prompts and sampling settings; "with bebop" leaves ``VLLM_PLUGINS``
unset (every installed plugin loads, bebop's patches apply), "without bebop" lists every
installed vLLM plugin except bebop's. Each run is a fresh engine in a subprocess; arms alternate;
medians of decode tokens/s (generation only, engine start excluded) and their ratio.

    .venv/bin/python benchmarks/bench_plain_engine.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bebop_vllm.hardware import describe_machine, machine_info

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _results
from _results import write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "plain_engine"


def _worker(out: str, batch: int, max_tokens: int) -> None:
    from vllm import LLM, SamplingParams

    from bebop_vllm.data import load_prompts
    from bebop_vllm.paths import default_model_dir

    prompts = [p.messages[-1]["content"][:400] for p in load_prompts(split="heldout", limit_per_domain=batch)][:batch]
    llm = LLM(model=str(default_model_dir()), max_model_len=1024, seed=0, max_num_seqs=batch)
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=None)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    Path(out).write_text(json.dumps({"tokens": tokens, "seconds": seconds}))


def _other_plugins() -> str:
    from importlib.metadata import entry_points

    return ",".join(ep.name for ep in entry_points(group="vllm.general_plugins") if ep.name != "bebop") or "none"


def markdown(result: dict[str, Any]) -> str:
    """``plain_engine.md`` from the results dict."""
    med = result["median"]
    md = ["# Plain engine with bebop installed vs excluded", "",
          f"`{result['command']}` — {describe_machine(result['machine'])}; batch {result['batch']}, "
          f"{result['max_tokens']} tokens per request, T = 1, {result['repeats']} alternating fresh engines per arm, "
          f"median; wall {result['wall_seconds']} s.", "",
          "| arm | tokens/s (runs) | median |", "|---|---|---|"]
    md += [f"| {k} | {', '.join(f'{x:.1f}' for x in v)} | {med[k]:.1f} |"
           for k, v in result["tokens_per_second"].items()]
    md += ["", f"Ratio with / without: **{result['ratio_with_to_without']:.3f}**"]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per arm, alternating (default 3)")
    p.add_argument("--batch", type=int, default=8, help="concurrent requests (default 8)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results prefix (.json/.md)")
    args = p.parse_args(argv)
    machine = machine_info()  # before the runs: its load average is the one they started under
    rates: dict[str, list[float]] = {"with bebop installed": [], "bebop excluded (VLLM_PLUGINS)": []}
    t0 = time.time()
    for r in range(args.repeats):
        for arm in rates:
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
            env.pop("VLLM_PLUGINS", None)
            if arm.startswith("bebop excluded"):
                env["VLLM_PLUGINS"] = _other_plugins()
            out = RESULTS.parent / f".plain_engine_{r}.json"
            code = f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import bench_plain_engine as b; " \
                   f"b._worker({str(out)!r}, {args.batch}, {args.max_tokens})"
            subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
            res = json.loads(out.read_text())
            out.unlink()
            rates[arm].append(res["tokens"] / res["seconds"])
            print(f"repeat {r + 1}: {arm}: {rates[arm][-1]:.1f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    keys = list(rates)
    ratio = med[keys[0]] / med[keys[1]]
    cmd = "python benchmarks/bench_plain_engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": cmd, "machine": machine, "batch": args.batch, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "tokens_per_second": rates, "median": med,
              "ratio_with_to_without": ratio, "wall_seconds": round(time.time() - t0, 1)}
    write_results(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
