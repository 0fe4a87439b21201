"""Micro-benchmark: one call of the plugin's verifier (``BebopRejectionSampler.forward``) alone.

This times exactly what the model runner calls each verify step (bonus sampling with vLLM's
``Sampler``, vLLM's logits processors and sampling constraints, our accept / resample step,
the target entropies for the metrics), on vLLM's logits layout with ``rows = B * (k + 1)``
target rows of width V. vLLM's own ``RejectionSampler`` on the same inputs is timed in the
same run for scale (on CPU with the ``expand_batch_to_tokens`` fix, as the plugin applies it).

Scenarios (default B = 16, k = 3, V = 49,152: 64 rows x 49,152): all random at T = 1 with
draft probabilities; all greedy; half greedy / half random; random with half the requests
seeded. Each variant is timed alternately after a warm-up; medians are reported.

Small on purpose (< 30 s on one CPU thread); results written under benchmarks/results/
with the label given by ``--label`` (e.g. "before" / "after" a change).

    OMP_NUM_THREADS=1 python benchmarks/bench_verifier_step.py --label after
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bebop_vllm.hardware import machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="requests B (default 16)")
    parser.add_argument("--k", type=int, default=3, help="drafts per request (default 3)")
    parser.add_argument("--vocab", type=int, default=49_152, help="vocabulary V (default 49152)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per variant (median)")
    parser.add_argument("--label", default="run", help="results label, e.g. before / after")
    parser.add_argument("--note", default="", help="free text stored with the results")
    parser.add_argument("--no-save", action="store_true", help="print only")
    return parser.parse_args(argv)


def make_case(batch: int, k: int, vocab: int, scenario: str, seed: int = 0):
    """(spec_metadata, draft_probs, logits, sampling_metadata) for one scenario."""
    from bebop_vllm.kernels.vllm_baseline import make_sampling_metadata, make_spec_decode_metadata

    gen = torch.Generator().manual_seed(seed)
    rows = batch * (k + 1)
    logits = torch.randn(rows, vocab, generator=gen) * 2
    draft_rows = torch.arange(batch * k) + torch.arange(batch * k) // k
    draft_probs = (logits[draft_rows] + torch.randn(batch * k, vocab, generator=gen)).softmax(-1)
    draft_ids = torch.multinomial(draft_probs, 1, generator=gen).squeeze(1)
    temperature = torch.ones(batch)
    generators: dict[int, torch.Generator] = {}
    if scenario == "greedy":
        temperature.zero_()
        draft_probs = None
    elif scenario == "mixed":
        temperature[::2] = 0.0
    elif scenario == "seeded":
        generators = {i: torch.Generator().manual_seed(100 + i) for i in range(0, batch, 2)}
    spec = make_spec_decode_metadata(draft_ids, [k] * batch)
    sampling = make_sampling_metadata(temperature, generators=generators)
    return spec, draft_probs, logits, sampling


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    from bebop_vllm.kernels.vllm_baseline import cpu_expand_fixed, make_vllm_rejection_sampler
    from vllm.v1.sample.sampler import Sampler

    from bebop_vllm.plugin.verifier import BebopRejectionSampler

    vllm_verifier = make_vllm_rejection_sampler()
    ours = BebopRejectionSampler(Sampler())
    rows = []
    with cpu_expand_fixed():
        for scenario in ("random", "greedy", "mixed", "seeded"):
            case = make_case(args.batch, args.k, args.vocab, scenario)
            variants = {
                "bebop": lambda case=case: ours(*case),
                "vllm": lambda case=case: vllm_verifier(*case),
            }
            for fn in variants.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    times[name].append(timed(fn))
            row = {"scenario": scenario}
            for name, values in times.items():
                row[f"{name}_ms"] = round(statistics.median(values) * 1e3, 2)
            rows.append(row)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import vllm

    machine = machine_info()  # before the timings: its load average is the one they started under
    started = time.time()
    report = run(args)
    report.update(
        label=args.label,
        note=args.note,
        shape={"B": args.batch, "k": args.k, "V": args.vocab, "rows": args.batch * (args.k + 1)},
        repeats=args.repeats,
        environment={
            "torch": torch.__version__, "vllm": vllm.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        machine=machine,
        wall_seconds=round(time.time() - started, 1),
    )
    print(json.dumps(report, indent=2))
    if not args.no_save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"verifier_step_{args.label}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
