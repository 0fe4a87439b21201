"""Step-cost model: predicted seconds of one engine step, for the ``draft_length="auto"`` policy.

A step that verifies ``n`` tokens (one per request plus its drafts) and then drafts ``K`` depths
for ``B`` requests costs

    step_seconds(n, K, B) = target(n) + draft_pass(n) + K * draft_head(B) + max(K - 1, 0) * draft_forward(B)

- ``target(n)``: the target forward on n tokens, its lm_head on n rows and one float32 softmax
  over n rows (a stand-in for the sampler/verifier work per row);
- ``draft_pass(n)``: the drafter's first pass over the step's n tokens (vLLM's EAGLE proposer runs
  it every step, also with K = 0, to keep the drafter's KV cache complete);
- ``draft_head(B)``: the draft lm_head and draft sampling on B rows (once per depth);
- ``draft_forward(B)``: one more drafter forward on B tokens (depths 2..K).

Each curve is a list of (tokens, seconds) points, interpolated linearly and extrapolated with the
last segment's slope. The points come from, in order: a JSON file named in the speculative config
(``step_cost_file``), a cache file under ``$BEBOP_HOME/step_cost/`` keyed by machine (CPU model
and flags, or GPU name), model, dtype, heads, draft vocabulary, vLLM version, bebop's cost revision and thread count,
or a short calibration at engine start (:func:`calibrate`, a few seconds; written to that cache so
the next start is free). Without any of these :func:`default_model` gives rough relative costs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
# Part of the cache key: bumped when bebop's own drafting code gets cheaper or dearer, so a cache
# calibrated on the old code is not reused (2: draft sampling on the draft vocabulary, packed lm_head;
# 3: the heads compile where the target does).
COST_REVISION = 3
CURVES = ("target", "draft_pass", "draft_head", "draft_forward")
CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
logger = logging.getLogger("vllm.bebop.step_cost")

Points = list[tuple[int, float]]


def interpolate(points: Sequence[tuple[int, float]], x: float) -> float:
    """Piecewise-linear through ``points`` (sorted by x); flat below, last slope (>= 0) above."""
    if not points:
        return 0.0
    if x <= points[0][0]:
        return float(points[0][1])
    if len(points) == 1:  # one measurement: assume cost proportional to tokens above it
        return float(points[0][1]) * x / points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + max(y1 - y0, 0.0) / (x1 - x0) * (x - x1)


def interpolate_array(points: Sequence[tuple[int, float]], xs: Any) -> Any:
    """:func:`interpolate` over a numpy array."""
    import numpy as np

    xs = np.asarray(xs, dtype=np.float64)
    px = np.array([p[0] for p in points], dtype=np.float64)
    py = np.array([p[1] for p in points], dtype=np.float64)
    out = np.interp(xs, px, py)
    if len(points) == 1:
        return np.where(xs > px[0], py[0] * xs / px[0], py[0])
    slope = max(py[-1] - py[-2], 0.0) / (px[-1] - px[-2])
    return np.where(xs > px[-1], py[-1] + slope * (xs - px[-1]), out)


def rising_points(pts: Points) -> Points:
    """``pts`` (sorted) without the points that do not rise above the last one kept.

    More tokens never cost less, and every extra token costs something. A measured dip (timing
    noise, a kernel switching at some size) would make the planner add drafts to reach the cheap
    size: measured on this project's CPU, target 128 tokens 147 ms and 256 tokens 120 ms, and the
    auto policy drafted at batch 64 (0.82x plain). Clamping the dip to its predecessor's value
    made the segment flat instead, so the verify tokens up to the dip's size were free: in an
    RL-shaped rollout with 256 requests in flight (calibrated 128 and 256 tokens both 152.85 ms)
    the policy filled batches of ~200 requests up to 256 tokens with drafts, 0.29 drafts per
    token, 0.69x plain. Dropping the point interpolates across the dip, every segment rises. A
    curve where nothing rises above its first point keeps that value (flat: nothing to go on).
    """
    kept = pts[:1]
    for x, y in pts[1:]:
        if y > kept[-1][1]:
            kept.append((x, y))
    if len(kept) < 2:
        kept = [(x, max(y for _, y in pts[: i + 1])) for i, (x, _) in enumerate(pts)]
    return kept


@dataclass
class StepCostModel:
    """Four cost curves (see module doc), seconds; ``source`` says where they came from."""

    target: Points
    draft_pass: Points
    draft_head: Points
    draft_forward: Points
    source: str = "default"
    key: dict[str, Any] = field(default_factory=dict)
    calibration_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in CURVES:
            pts = sorted((int(x), float(y)) for x, y in getattr(self, name))
            if not pts or any(x < 1 or y < 0 for x, y in pts) or len({x for x, _ in pts}) != len(pts):
                raise ValueError(f"step cost curve {name!r} needs distinct points (tokens >= 1, seconds >= 0)")
            setattr(self, name, rising_points(pts))

    def step_seconds(self, num_tokens: Any, depths: int, batch: int) -> Any:
        """Seconds of one step; ``num_tokens`` an int or a numpy array (then an array)."""
        if not isinstance(num_tokens, (int, float)):
            seconds = interpolate_array(self.target, num_tokens) + interpolate_array(self.draft_pass, num_tokens)
        else:
            seconds = interpolate(self.target, num_tokens) + interpolate(self.draft_pass, num_tokens)
        if depths > 0:
            seconds += depths * interpolate(self.draft_head, batch)
            seconds += (depths - 1) * interpolate(self.draft_forward, batch)
        return seconds

    def for_batch(self, batch: int) -> Callable[[int, int], float]:
        """``step_seconds(num_tokens, depths)`` for a batch of ``batch`` requests (the policy's input)."""
        return lambda num_tokens, depths: self.step_seconds(num_tokens, depths, batch)

    def summary(self) -> str:
        def fmt(points: Points) -> str:
            return " ".join(f"{x}:{y * 1e3:.2f}" for x, y in points)

        return (f"step cost ({self.source}; tokens:ms) target [{fmt(self.target)}] draft_pass "
                f"[{fmt(self.draft_pass)}] draft_head [{fmt(self.draft_head)}] draft_forward "
                f"[{fmt(self.draft_forward)}]")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> StepCostModel:
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"step cost format_version {data.get('format_version')} != {FORMAT_VERSION}")
        return cls(**{name: [tuple(p) for p in data[name]] for name in CURVES}, source=source,
                   key=dict(data.get("key") or {}), calibration_seconds=float(data.get("calibration_seconds", 0.0)))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)


def load(path: str | Path) -> StepCostModel:
    path = Path(path).expanduser()
    return StepCostModel.from_json(json.loads(path.read_text()), source=f"file:{path}")


def forget(model: StepCostModel) -> Path | None:
    """Drop a calibrated or cached model: its entry in this process and its cache file, so the next
    engine start calibrates afresh (a user's ``step_cost_file`` and the default are left alone).
    Returns the removed file, if any."""
    for digest, known in list(_REGISTRY.items()):
        if known is model:
            del _REGISTRY[digest]
    if model.source.startswith("cache:"):
        path: Path | None = Path(model.source[len("cache:"):])
    elif model.source == "calibrated" and model.key:
        path = cache_path(model.key)
    else:
        return None
    try:
        path.unlink()
    except OSError:
        return None
    return path


def default_model(on_gpu: bool) -> StepCostModel:
    """Rough relative costs (a plain batch-1 step = 1): used only without calibration or a file.

    GPU: memory-bound (nearly flat) up to ~64 tokens. CPU: measured shape of the 135M default model
    on 2 cores (batch 16 costs ~2.4 batch-1 steps). Drafter pass ~5 %, a draft depth ~4 % of the
    target at the same size.
    """
    if on_gpu:
        target = [(1, 1.0), (64, 1.1), (256, 1.6), (4096, 17.0)]
    else:
        target = [(1, 1.0), (16, 2.4), (64, 7.0), (4096, 400.0)]

    def scaled(points: Points, factor: float) -> Points:
        return [(x, factor * y) for x, y in points]

    return StepCostModel(target=target, draft_pass=scaled(target, 0.05), draft_head=scaled(target, 0.04),
                         draft_forward=scaled(target, 0.04), source="default")


# --- cache key -------------------------------------------------------------------------------

def machine_id() -> dict[str, Any]:
    """What makes timings comparable: the accelerator (or CPU model + flags) and the thread
    settings vLLM derives from the environment. It must be the same in the worker (which
    calibrates) and the scheduler (which plans): with vLLM's multiprocess executor they are
    different processes, and the CPU worker changes its own thread count and ``OMP_NUM_THREADS``
    after it starts, so neither is part of the key (the inherited environment variables are)."""
    import torch

    info: dict[str, Any] = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    for env in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "CUDA_VISIBLE_DEVICES"):
        if os.environ.get(env):
            info[env] = os.environ[env]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "cpu_model" not in info:
            info["cpu_model"] = value.strip()
        elif key.strip() == "flags" and "cpu_flags" not in info:
            info["cpu_flags"] = hashlib.sha256(" ".join(sorted(value.split())).encode()).hexdigest()[:16]
    return info


def compilation_mode(vllm_config: Any) -> str:
    """The engine's ``CompilationMode`` name (``NONE`` with ``enforce_eager``)."""
    mode = getattr(getattr(vllm_config, "compilation_config", None), "mode", None)
    return "NONE" if mode is None else str(getattr(mode, "name", mode))


def _heads_draft_width(draft_model_config: Any) -> int | None:
    """The heads' MLP width from their config.json (``intermediate_size``; None if unknown)."""
    width = getattr(getattr(draft_model_config, "hf_config", None), "intermediate_size", None)
    return int(width) if isinstance(width, int) else None


def cache_key(vllm_config: Any) -> dict[str, Any]:
    from bebop_vllm.plugin.version import installed_vllm_version

    model_config = vllm_config.model_config
    spec = vllm_config.speculative_config
    opts = (vllm_config.additional_config or {}).get("bebop") or {}
    return {
        **machine_id(),
        "model": str(model_config.model),
        "dtype": str(model_config.dtype),
        "heads": str(getattr(spec, "model", None)),
        # the draft layer's size: heads retrained in place with a wider MLP cost more per pass
        "heads_draft_width": _heads_draft_width(getattr(spec, "draft_model_config", None)),
        "num_speculative_tokens": int(getattr(spec, "num_speculative_tokens", 0) or 0),
        "draft_vocab_size": opts.get("draft_vocab_size"),
        "draft_sampling": opts.get("draft_sampling"),
        "tensor_parallel_size": int(vllm_config.parallel_config.tensor_parallel_size),
        # A compiled engine's passes cost less than eager ones, and not by one factor (measured on a
        # 2-core AVX2 CPU, float32: plain step ~1.5x faster compiled, a draft pass 2.5 -> 1.5 ms).
        "compilation": compilation_mode(vllm_config),
        "vllm": installed_vllm_version(),
        "format_version": FORMAT_VERSION,
        "cost_revision": COST_REVISION,
    }


def cache_path(key: dict[str, Any]) -> Path:
    from bebop_vllm.paths import bebop_home

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return bebop_home() / "step_cost" / f"{digest}.json"


# --- calibration -----------------------------------------------------------------------------

def _timer(device_sync: Callable[[], None]) -> Callable[[Callable[[], Any], int], float]:
    def timed(fn: Callable[[], Any], reps: int = 2) -> float:
        fn()  # warm-up (allocations, compiled shapes)
        device_sync()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            device_sync()
            best = min(best, time.perf_counter() - start)
        return best

    return timed


def measure_curves(run_target: Callable[[int], Any], run_draft_pass: Callable[[int], Any],
                   run_draft_head: Callable[[int], Any], run_draft_forward: Callable[[int], Any],
                   max_tokens: int, max_batch: int, device_sync: Callable[[], None] = lambda: None,
                   budget_s: float = 4.0, sizes: Sequence[int] = CALIBRATION_SIZES) -> dict[str, Points]:
    """Time the four curves at growing sizes until the time budget is spent (or the size caps).

    The target curve gets ~3/4 of the budget; a size is measured only while the measurements so
    far leave room for it (each size runs three times: one warm-up, two timed). Curves get at
    least two points when the caps allow (extrapolation needs a slope).
    """
    timed = _timer(device_sync)
    start = time.perf_counter()
    curves: dict[str, Points] = {name: [] for name in CURVES}

    def sweep(name: str, run: Callable[[int], Any], cap: int, deadline: float) -> None:
        last = 0.0
        for n in [s for s in sizes if s <= cap] or [1]:
            # each size ~3 runs; a step usually costs at most ~2x the previous size's
            if len(curves[name]) >= 2 and time.perf_counter() + 6 * last > deadline:
                break
            last = timed(lambda n=n: run(n))
            curves[name].append((n, last))

    sweep("target", run_target, max_tokens, start + 0.75 * budget_s)
    rest = start + budget_s
    sweep("draft_pass", run_draft_pass, max_tokens, start + 0.75 * budget_s + 0.1 * budget_s)
    sweep("draft_head", run_draft_head, max_batch, rest - 0.08 * budget_s)
    sweep("draft_forward", run_draft_forward, max_batch, rest)
    return curves


def calibrate(runner: Any, budget_s: float = 4.0) -> StepCostModel:
    """Measure the four curves on a V1 model runner whose KV cache is initialised (engine start).

    Uses the runner's own dummy-run machinery (vLLM 0.32.0 ``GPUModelRunner._dummy_run`` with the
    drafter hidden, ``SpecDecodeBaseProposer.dummy_run`` with one forward pass): no real requests,
    no KV cache writes that matter. Attention over long contexts is not in these numbers.
    """
    import torch

    device = runner.device
    on_gpu = getattr(device, "type", str(device)) == "cuda"
    device_sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    drafter = runner.drafter
    spec = runner.speculative_config
    max_tokens = int(runner.scheduler_config.max_num_batched_tokens)
    max_batch = int(runner.scheduler_config.max_num_seqs)
    k = int(spec.num_speculative_tokens)
    max_tokens = min(max_tokens, max_batch * (k + 1))
    dtype = runner.dtype if hasattr(runner, "dtype") else runner.model_config.dtype

    def run_target(n: int) -> None:
        saved = runner.speculative_config
        runner.speculative_config = None  # _dummy_run would also run the drafter's k passes
        try:
            hidden, _ = runner._dummy_run(n, skip_eplb=True)
        finally:
            runner.speculative_config = saved
        logits = runner.model.compute_logits(hidden[:n])
        torch.softmax(logits.float(), dim=-1)

    def run_draft_pass(n: int) -> None:
        drafter.dummy_run(n, is_graph_capturing=True)  # is_graph_capturing: exactly one forward

    def run_draft_head(b: int) -> None:
        h = torch.full((b, drafter.hidden_size), 0.01, device=device, dtype=dtype)
        probs = torch.softmax(drafter.model.compute_logits(h).float(), dim=-1)
        (probs / torch.empty_like(probs).fill_(1.0)).argmax(dim=-1)  # no RNG: keep the engine's seed stream

    def run_draft_forward(b: int) -> None:
        drafter.dummy_run(b, is_graph_capturing=True)

    start = time.perf_counter()
    with torch.inference_mode(), torch.random.fork_rng(devices=[device] if on_gpu else []):
        curves = measure_curves(run_target, run_draft_pass, run_draft_head, run_draft_forward,
                                max_tokens=max_tokens, max_batch=max_batch, device_sync=device_sync,
                                budget_s=budget_s)
    return StepCostModel(**curves, source="calibrated", calibration_seconds=time.perf_counter() - start)


# --- engine-side lookup ------------------------------------------------------------------------

# In-process hand-off from the worker (which calibrates) to the scheduler (which plans), keyed by
# the cache key digest: with vLLM's in-process executor both live in the EngineCore process.
_REGISTRY: dict[str, StepCostModel] = {}


def _digest(key: dict[str, Any]) -> str:
    return cache_path(key).stem


def resolve(vllm_config: Any, runner: Any | None = None, budget_s: float = 4.0) -> StepCostModel:
    """The engine's cost model: file option, else cache, else calibration (runner given), else default."""
    opts = (vllm_config.additional_config or {}).get("bebop") or {}
    if opts.get("step_cost_file"):
        model = load(opts["step_cost_file"])
        logger.info("bebop %s", model.summary())
        return model
    key = cache_key(vllm_config)
    digest = _digest(key)
    if digest in _REGISTRY:
        return _REGISTRY[digest]
    path = cache_path(key)
    if path.is_file():
        try:
            model = StepCostModel.from_json(json.loads(path.read_text()), source=f"cache:{path}")
            _REGISTRY[digest] = model
            logger.info("bebop %s", model.summary())
            return model
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("bebop: ignoring unreadable step cost cache %s (%s)", path, exc)
    if runner is not None:
        try:
            model = calibrate(runner, budget_s=budget_s)
        except Exception as exc:  # calibration must never stop the engine: the policy is speed only
            logger.warning("bebop: step cost calibration failed (%s: %s); using default relative costs",
                           type(exc).__name__, exc)
        else:
            model.key = key
            _REGISTRY[digest] = model
            try:
                model.save(path)
            except OSError as exc:
                logger.warning("bebop: could not cache the step cost model at %s (%s)", path, exc)
            logger.info("bebop %s (calibrated in %.1f s, cached at %s)", model.summary(),
                        model.calibration_seconds, path)
            return model
    import torch

    model = default_model(on_gpu=torch.cuda.is_available())
    logger.warning("bebop: no step cost calibration for this engine; using %s", model.summary())
    return model
