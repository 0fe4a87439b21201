"""Record what a throughput benchmark measured for a heads folder into its ``bebop.json``.

``benchmarks/bench_throughput.py --heads DIR ...`` measures the heads served by vLLM; this copies
its batch-1 numbers (tokens per verify step of the fixed-k engine per temperature and domain, and
tokens/s vs plain decoding per engine) into the ``engine`` field of ``DIR/bebop.json``, so the
shipped heads carry their engine-measured numbers next to the teacher-forced held-out ones::

    python benchmarks/record_engine_metrics.py --throughput benchmarks/results/throughput_v5.json

The heads folder is the one the benchmark ran with (``config.heads`` in its json) unless
``--heads`` names another; a benchmark of different heads is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bebop_vllm.errors import BebopError  # noqa: E402
from bebop_vllm.hardware import describe_machine  # noqa: E402
from bebop_vllm.heads.metadata import EngineMeasured, read_metadata, write_metadata  # noqa: E402


def engine_measured(result: dict[str, Any], batch: int = 1, fixed_engine: str = "bebop") -> EngineMeasured:
    """The ``engine`` metadata from a bench_throughput result (its ``<out>.json``)."""
    cells = [c for c in result.get("cells", []) if c.get("batch") == batch]
    per_step: dict[str, dict[str, float]] = {}
    for c in cells:
        length = c["engines"].get(fixed_engine, {}).get("mean_accepted_len")
        if length is not None:
            per_step.setdefault(str(float(c["temperature"])), {})[c["domain"]] = round(float(length), 3)
    if not per_step:
        raise BebopError(f"the throughput result has no batch-{batch} cells with engine {fixed_engine!r} "
                         "(run bench_throughput.py with --batches 1 and --engines none,bebop,...)")
    # engines named ENGINE@NAME ran other heads (bench_throughput.py --alt-heads): not these heads' numbers
    speedups = {key.split("|")[0]: {e: round(float(r), 3) for e, r in ratios.items() if "@" not in e}
                for key, ratios in result.get("summary", {}).items() if key.split("|")[1] == str(batch)}
    machine = result.get("machine", "")
    return EngineMeasured(command=result["command"], k=int(result["config"]["k"]),
                          machine=machine if isinstance(machine, str) else describe_machine(machine),
                          tokens_per_verify_step=per_step, speedup_vs_plain=speedups)


def record(throughput_json: Path, heads: Path | None = None) -> Path:
    result = json.loads(throughput_json.read_text())
    ran_with = Path(result["config"]["heads"])
    heads = heads or ran_with
    if heads.resolve() != ran_with.resolve():
        raise BebopError(f"{throughput_json} measured {ran_with}, not {heads}")
    meta = read_metadata(heads)
    meta.engine = engine_measured(result)
    return write_metadata(heads, meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--throughput", type=Path, required=True, help="a bench_throughput.py result (.json)")
    p.add_argument("--heads", type=Path, default=None,
                   help="heads folder to record into (default: the one the benchmark ran with)")
    args = p.parse_args(argv)
    try:
        path = record(args.throughput, args.heads)
    except BebopError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"recorded the engine-measured numbers into {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
