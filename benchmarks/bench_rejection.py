"""Benchmark: the plugin's verifier vs vLLM 0.32's RejectionSampler on identical inputs.

"ours" is exactly what the plugin runs each verify step: ``BebopRejectionSampler.forward``
(vLLM's ``Sampler`` for the bonus tokens, vLLM's processors and sampling constraints, then the
fused ``rejection_sample_from_logits`` on the draft rows with the bonus tokens as ids, plus the
per-position target entropies the metrics read). "vllm" is vLLM's ``RejectionSampler.forward``.
Both get the same target logits ``[sum(k+1), V]`` (the model runner's layout), the same drafts
and draft probabilities, all requests random at the same temperature (no top-k / top-p), the
same bonus ``Sampler``, and return int32 ``[B, k+1]``. Each shape is timed alternately after a
warm-up, and the medians and their ratio come from the same run.

CPU: ours is the vectorised torch path; vLLM's RejectionSampler runs with its C++ CPU
fallbacks, both with the ``expand_batch_to_tokens`` bug (docs/design.md#the-cpu-temperature-bug)
patched (the bug returns uninitialised per-token temperatures: it makes vLLM's *outputs* wrong,
not its speed; the plugin patches it in engines).
CUDA: ours are the Triton kernels; also reports effective bandwidth = (target logits read
once + the draft-probability rows of the emitted positions) / time, as a fraction of the
device's peak memory bandwidth.

Example (the committed CPU results):
    .venv/bin/python benchmarks/bench_rejection.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from bebop_vllm.hardware import describe_machine, machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256],
                        help="numbers of requests B (default: 1 8 64 256)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5],
                        help="draft tokens per request k (default: 1 3 5)")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[49_152, 151_936],
                        help="vocabulary sizes V (default: 49152 151936)")
    parser.add_argument("--draft-kinds", nargs="+", default=["probabilistic", "one-hot"],
                        choices=["probabilistic", "one-hot"],
                        help="draft kinds: sampled with draft_probs, or one-hot (greedy) drafts")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="temperature of every request (random sampling; default 1.0)")
    parser.add_argument("--logits-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the target logits (default float32)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed calls per verifier at small shapes (median reported)")
    parser.add_argument("--repeats-large", type=int, default=3,
                        help="timed calls per verifier when B*(k+1)*V exceeds --large-elements")
    parser.add_argument("--large-elements", type=float, default=5e7,
                        help="B*(k+1)*V above which --repeats-large applies (default 5e7)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="device memory bandwidth in GB/s for the roofline fraction "
                             "(default: from CUDA device properties)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both verifiers (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic inputs")
    parser.add_argument("--out-name", default=None,
                        help="results file stem under benchmarks/results/ "
                             "(default rejection_<device type>)")
    return parser.parse_args(argv)


def make_inputs(batch: int, k: int, vocab: int, kind: str, dtype: torch.dtype,
                device: torch.device, seed: int) -> dict:
    """Target logits, drafts sampled from a draft distribution close to the target."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows, drafts = batch * (k + 1), batch * k
    logits = torch.randn(rows, vocab, generator=gen) * 2
    draft_rows = torch.arange(drafts) + torch.arange(drafts) // k  # draft rows of the layout
    draft_logits = logits[draft_rows] + torch.randn(drafts, vocab, generator=gen)
    if kind == "probabilistic":
        draft_probs = draft_logits.softmax(-1)
        draft_ids = torch.multinomial(draft_probs, 1, generator=gen).squeeze(1)
    else:
        draft_probs = None
        draft_ids = draft_logits.argmax(-1)
    return {
        "logits": logits.to(dtype).to(device),
        "draft_ids": draft_ids.to(device),
        "draft_probs": draft_probs.to(device) if draft_probs is not None else None,
        "num_draft_tokens": [k] * batch,
        "temperature": None,
    }


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call (device synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def peak_bandwidth_gbps(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # DDR: two transfers per clock


def measure_shape(
    inputs: dict, vllm_sampler, device: torch.device, args: argparse.Namespace, *,
    vocab: int, kind: str, k: int, peak: float | None,
) -> dict:
    """Median µs of vLLM's verifier and the plugin's on one shape, timed alternately."""
    from bebop_vllm.kernels.vllm_baseline import (
        cpu_expand_fixed,
        make_sampling_metadata,
        make_spec_decode_metadata,
    )

    from bebop_vllm.plugin.verifier import BebopRejectionSampler

    batch = len(inputs["num_draft_tokens"])
    temperature = torch.full((batch,), args.temperature, device=device)
    spec_meta = make_spec_decode_metadata(inputs["draft_ids"], inputs["num_draft_tokens"])
    sampling_meta = make_sampling_metadata(temperature)
    ours_verifier = BebopRejectionSampler(vllm_sampler.sampler)

    def call_vllm() -> torch.Tensor:
        return vllm_sampler(
            spec_meta, inputs["draft_probs"], inputs["logits"], sampling_meta
        ).sampled_token_ids

    def call_ours() -> torch.Tensor:
        return ours_verifier(
            spec_meta, inputs["draft_probs"], inputs["logits"], sampling_meta
        ).sampled_token_ids

    variants: dict[str, Callable[[], object]] = {"vllm": call_vllm, "ours": call_ours}
    large = batch * (k + 1) * vocab > args.large_elements
    repeats = args.repeats_large if large else args.repeats
    times: dict[str, list[float]] = {name: [] for name in variants}
    with cpu_expand_fixed():
        if not large:  # warm-up (allocator, lazy init); large shapes are dominated by bandwidth
            for fn in variants.values():
                fn()
        for _ in range(repeats):
            for name, fn in variants.items():
                times[name].append(timed(fn, device))
    medians_us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    row = {
        "V": vocab, "draft": kind, "k": k, "B": batch, "repeats": repeats,
        "vllm_us": round(medians_us["vllm"], 1),
        "ours_us": round(medians_us["ours"], 1),
        "speedup_vs_vllm": round(medians_us["vllm"] / medians_us["ours"], 3),
    }
    if device.type == "cuda":
        logits_bytes = batch * (k + 1) * vocab * inputs["logits"].element_size()
        draft_bytes = batch * vocab * 4 if kind == "probabilistic" else 0
        gbps = (logits_bytes + draft_bytes) / (medians_us["ours"] * 1e-6) / 1e9
        row["ours_gbps"] = round(gbps, 1)
        if peak:
            row["fraction_of_peak"] = round(gbps / peak, 3)
    return row


def run(args: argparse.Namespace) -> dict:
    from bebop_vllm.kernels.vllm_baseline import make_vllm_rejection_sampler

    device = torch.device(args.device)
    dtype = getattr(torch, args.logits_dtype)
    vllm_sampler = make_vllm_rejection_sampler()
    peak = peak_bandwidth_gbps(device, args.peak_gbps)
    grid = [
        (vocab, kind, k, batch)
        for vocab in args.vocab_sizes for kind in args.draft_kinds
        for k in args.ks for batch in args.batch_sizes
    ]
    rows_out = []
    for vocab, kind, k, batch in tqdm(grid, desc="shapes", unit="shape"):
        inputs = make_inputs(batch, k, vocab, kind, dtype, device, args.seed)
        rows_out.append(
            measure_shape(inputs, vllm_sampler, device, args, vocab=vocab, kind=kind, k=k, peak=peak)
        )
    return {"rows": rows_out, "peak_gbps": peak}


def environment(device: torch.device) -> dict:
    import vllm

    env = {
        "device": str(device),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def to_markdown(report: dict) -> str:
    rows = report["rows"]
    has_entropy = any("ours_entropy_us" in r for r in rows)  # results of the kernel-only version
    has_gpu = any("ours_gbps" in r for r in rows)
    speedups = [r["speedup_vs_vllm"] for r in rows]
    slower = [r for r in rows if r["speedup_vs_vllm"] < 1]
    lines = [
        "# Rejection sampling: the plugin's verifier (BebopRejectionSampler) vs vLLM 0.32 RejectionSampler",
        "",
        "Both timed as whole verifier calls (bonus sampling, processors, accept/resample; ours also",
        "computes the per-position target entropies its metrics read).",
        "",
        f"Command: `{report['command']}`",
        "",
        "Environment: " + ", ".join(f"{key}={value}" for key, value in report["environment"].items()),
        "",
        *([f"Machine: {describe_machine(report['machine'])}.", ""] if report.get("machine") else []),
        f"Headline: speedup (vLLM median / ours median, same run) min {min(speedups):.2f}x, "
        f"median {statistics.median(speedups):.2f}x, max {max(speedups):.2f}x over {len(rows)} "
        f"shapes; {len(slower)} shape(s) where ours is slower.",
        "",
    ]
    header = ["V", "draft", "k", "B", "reps", "vLLM µs", "ours µs", "speedup"]
    if has_entropy:
        header += ["ours+entropy µs", "speedup (with entropy)"]
    if has_gpu:
        header += ["ours GB/s", "fraction of peak"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["V"], r["draft"], r["k"], r["B"], r["repeats"], r["vllm_us"], r["ours_us"],
                 f"{r['speedup_vs_vllm']:.2f}x"]
        if has_entropy:
            cells += [r.get("ours_entropy_us", ""), f"{r.get('entropy_speedup_vs_vllm', 0):.2f}x"]
        if has_gpu:
            cells += [r.get("ours_gbps", ""), r.get("fraction_of_peak", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    machine = machine_info()  # before the timings: its load average is the one they started under
    started = time.time()
    report = run(args)
    report["command"] = "python benchmarks/bench_rejection.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    report["environment"] = environment(device)
    report["machine"] = machine
    report["wall_seconds"] = round(time.time() - started, 1)
    stem = args.out_name or f"rejection_{device.type}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / f"{stem}.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
