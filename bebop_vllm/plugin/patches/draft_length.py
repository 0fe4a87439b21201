"""Per-request draft lengths (``draft_length="auto"`` or ``"entropy"``), decided in the scheduler.

vLLM 0.32 has "dynamic speculative decoding": ``SchedulerOutput.num_spec_tokens_to_schedule`` (K)
is how many draft depths the runner's EAGLE proposer runs at the end of the step
(``SpecDecodeBaseProposer.propose(num_speculative_tokens=K)``, llm_base_proposer.py:512); with
K = 0 it runs only its first pass over the step's tokens, which keeps the drafter's KV cache
complete, and returns no drafts (llm_base_proposer.py:617). The ``speculative_config`` patch
turns that machinery on (a one-range ``num_speculative_tokens_per_batch_size``); the hooks here
replace its batch-size lookup by our plan, per step:

1. ``Scheduler._update_after_schedule`` (scheduler.py:1616, called at the end of ``schedule``):
   the :class:`DraftPlanner` chooses k_i per scheduled request (``draft_policy`` for "auto",
   ``draft_length.choose_draft_length`` for "entropy") and sets K = max k_i on the output.
2. ``AsyncScheduler._update_after_schedule`` (async_scheduler.py:25): under async scheduling the
   next step's drafts are placeholders of length K for every request; we shorten each to its k_i
   (the runner copies the first k_i of each request's K drafts, gpu_model_runner.py:1780-1870).
3. ``Scheduler.update_draft_token_ids`` (scheduler.py:2550, synchronous scheduling): each
   request's K drafts are cut to its k_i before they are scheduled.
4. ``Scheduler.update_from_output`` (scheduler.py:2026): each request's accepted/drafted counts
   and its step entropy (attached by the runner, :mod:`.metrics`) update its acceptance estimate;
   the step's wall time (from the end of its scheduling, or of the previous step's update if that
   came later, to the arrival of its output) against the cost model's prediction updates the
   :class:`~bebop_vllm.draft_policy.StepTimeCorrection` (decode-only steps).
5. ``Worker.compile_or_warm_up_model`` (gpu_worker.py:908) and ``CPUWorker.compile_or_warm_up_model``
   (cpu_worker.py:264): after warm-up, the step-cost model is loaded or calibrated
   (:func:`bebop_vllm.step_cost.resolve`) for the scheduler of the same process.

The plan for the drafts verified in step N+1 is made when step N is scheduled, so it sees the
outputs up to step N-1 (N-2 under async scheduling). Exactness does not depend on any of this:
every draft that is scheduled is verified by exact rejection sampling.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

from bebop_vllm.plugin.patches.base import Patch, on_cpu_host

logger = logging.getLogger("vllm.bebop.draft_length")

# Scheduler attribute: the DraftPlanner, or False when the engine runs no per-request policy.
PLANNER_ATTR = "_bebop_draft_planner"
# ModelRunnerOutput attribute (set by the runner, :mod:`.metrics`): {req_id: mean entropy, nats}.
POLICY_ENTROPY_ATTR = "bebop_policy_entropy"
# SchedulerOutput attribute: time.perf_counter() when the step's planning ended.
SCHEDULED_AT_ATTR = "_bebop_scheduled_at"
DEFAULT_PRIOR_ALPHA = 0.5
# Plain steps running faster than this fraction of the step-cost model's prediction: the model was
# calibrated while other work shared the CPU (healthy runs measure 1.1-1.3: the real step adds
# the scheduler and sampler to the bare forward passes; contention only ever adds time).
CONTENDED_PLAIN_RATIO = 0.7
LOG_EVERY_S = 60.0
# vLLM's dynamic-SD schedule that marks an engine as "variable K" (range end capped at max_num_seqs).
DYNAMIC_SCHEDULE_END = 1 << 30


def heads_prior_alpha(heads_dir: str | None) -> float:
    """Mean held-out per-depth acceptance from the heads' bebop.json, else DEFAULT_PRIOR_ALPHA."""
    try:
        meta = json.loads((Path(str(heads_dir)) / "bebop.json").read_text())
        alphas = [float(a) for a in meta["heldout"]["alphas"]]
        return sum(alphas) / len(alphas) if alphas else DEFAULT_PRIOR_ALPHA
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_PRIOR_ALPHA


class DraftPlanner:
    """Per-scheduler state of the draft-length policy (see module doc)."""

    def __init__(self, opts: Any, vllm_config: Any, max_k: int) -> None:
        from bebop_vllm.draft_policy import StepTimeCorrection

        self.mode = opts.draft_length
        self.fit = None if opts.acceptance_fit is None else tuple(opts.acceptance_fit)
        self.token_cost = opts.draft_token_cost
        self.min_gain = opts.draft_min_gain
        self.max_k = max_k
        self.vllm_config = vllm_config
        self.prior_alpha = heads_prior_alpha(opts.model)
        self._cost: Any = None
        self.estimates: dict[str, Any] = {}
        self.lengths: dict[str, int] = {}
        self.correction = StepTimeCorrection()
        self._last_update_end = 0.0
        self._calibration_checked = False
        self._stats = {"steps": 0, "draft_steps": 0, "depths": 0, "drafts": 0, "requests": 0}
        self._last_log = time.monotonic()

    @property
    def cost(self) -> Any:
        if self._cost is None:
            from bebop_vllm.step_cost import resolve

            self._cost = resolve(self.vllm_config)
        return self._cost

    def estimate(self, req_id: str) -> Any:
        est = self.estimates.get(req_id)
        if est is None:
            from bebop_vllm.draft_policy import AcceptanceEstimate

            est = self.estimates[req_id] = AcceptanceEstimate(prior_alpha=self.prior_alpha)
        return est

    def plan(self, scheduler: Any, scheduler_output: Any) -> int:
        """Choose k_i for every scheduled request; return K = max k_i (this step's draft depths)."""
        scheduled = scheduler_output.num_scheduled_tokens
        req_ids, eligible, base = [], [], 0
        for req_id, n in scheduled.items():
            request = scheduler.requests.get(req_id)
            decoding = request is not None and not request.is_prefill_chunk
            req_ids.append(req_id)
            eligible.append(decoding)
            base += 1 if decoding else int(n)  # a prefill chunk likely schedules as much next step
        self.lengths = {}
        if not any(eligible):
            return 0
        if self.mode == "entropy":
            from bebop_vllm.draft_length import choose_draft_length

            assert self.fit is not None
            lengths = [choose_draft_length(self.estimate(r).entropy, self.fit, self.max_k, self.token_cost)
                       if ok else 0 for r, ok in zip(req_ids, eligible, strict=True)]
        else:
            from bebop_vllm.draft_policy import plan_draft_lengths

            alphas = [self.estimate(r).alpha(self.fit) for r in req_ids]
            step_seconds = self.correction.corrected(self.cost.for_batch(len(req_ids)), len(req_ids), base)
            lengths = list(plan_draft_lengths(alphas, self.max_k, step_seconds,
                                              base_tokens=base, min_gain=self.min_gain,
                                              eligible=eligible).lengths)
            if base == len(req_ids):  # decode-only: the steps StepTimeCorrection measures
                probe = self.correction.probe(len(req_ids), max(lengths) > 0)
                explore = None if probe is not None else self.correction.explore(len(req_ids), max(lengths),
                                                                                 self.max_k)
                if probe is not None:
                    lengths = [int(ok) if probe else 0 for ok in eligible]
                elif explore is not None:  # one depth more or less, for the requests at the top depth
                    top = max(lengths)
                    lengths = [min(k, explore) if explore < top else (explore if k == top else k) for k in lengths]
        self.lengths = dict(zip(req_ids, lengths, strict=True))
        depths = max(lengths)
        self._count(depths, lengths)
        return depths

    def observe(self, scheduler_output: Any, model_runner_output: Any) -> None:
        """Fold one step's verify outcome and entropies into the requests' estimates."""
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        invalid = scheduler_output.num_invalid_spec_tokens or {}
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index or {}
        for req_id, drafts in spec.items():
            drafted = len(drafts) - int(invalid.get(req_id, 0))
            i = index.get(req_id)
            if drafted <= 0 or i is None or not sampled or i >= len(sampled) or not sampled[i]:
                continue
            self.estimate(req_id).observe(drafted, len(sampled[i]) - 1)
        for req_id, h in (getattr(model_runner_output, POLICY_ENTROPY_ATTR, None) or {}).items():
            if req_id in self.estimates or req_id in index:
                self.estimate(req_id).entropy = float(h)

    def observe_step_time(self, scheduler_output: Any, arrived_at: float) -> None:
        """Wall time of a decode-only step vs the cost model (see module doc, hook 4)."""
        scheduled_at = getattr(scheduler_output, SCHEDULED_AT_ATTR, None)
        if scheduled_at is None or self._cost is None:
            return
        started = max(scheduled_at, self._last_update_end)
        batch = len(scheduler_output.num_scheduled_tokens)
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        drafts = sum(len(d) for d in spec.values())
        tokens = int(scheduler_output.total_num_scheduled_tokens)
        if batch == 0 or tokens != batch + drafts:  # a prefill in the step: not what the model predicts
            return
        depths = int(scheduler_output.num_spec_tokens_to_schedule or 0)
        predicted = float(self.cost.step_seconds(tokens, depths, batch))
        base = float(self.cost.step_seconds(batch, 0, batch))
        self.correction.observe(batch, drafts > 0 or depths > 0, predicted, arrived_at - started, base)
        if not self._calibration_checked:
            self._check_calibration()

    def _check_calibration(self) -> None:
        """A calibration made while other work shared the CPU (e.g. two engines started at once,
        as ``bebop demo`` does) predicts steps far slower than they run, and its cache would
        mislead every later engine on this machine: drop the cache so the next start calibrates
        again. This run keeps the model: :class:`StepTimeCorrection` corrects it."""
        for (bucket, drafting), (ratio, n) in self.correction.ratios.items():
            if drafting or n < self.correction.min_steps or ratio >= CONTENDED_PLAIN_RATIO:
                continue
            from bebop_vllm.step_cost import forget

            self._calibration_checked = True
            removed = forget(self._cost)
            logger.warning("bebop draft_length=auto: plain steps of %d+ requests ran at %.2fx the step-cost "
                           "model's prediction, so it was probably calibrated while other work shared the CPU; "
                           "%s", 1 << (bucket - 1), ratio,
                           f"removed its cache {removed}: the next engine start calibrates afresh" if removed
                           else "the measured step times correct it for this run")
            return

    def forget_finished(self, live: Any) -> None:
        for req_id in [r for r in self.estimates if r not in live]:
            del self.estimates[req_id]

    def _count(self, depths: int, lengths: list[int]) -> None:
        s = self._stats
        s["steps"] += 1
        s["draft_steps"] += depths > 0
        s["depths"] += depths
        s["drafts"] += sum(lengths)
        s["requests"] += len(lengths)
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            logger.info("bebop draft_length=%s: %d steps, %.0f%% drafted, mean depths %.2f, mean drafts per "
                        "request %.2f (last %.0f s); step time observed/predicted: %s", self.mode, s["steps"],
                        100.0 * s["draft_steps"] / s["steps"], s["depths"] / s["steps"],
                        s["drafts"] / max(s["requests"], 1), LOG_EVERY_S, self.correction.summary())
            self._stats = dict.fromkeys(s, 0)


def planner_of(scheduler: Any) -> DraftPlanner | None:
    """The scheduler's planner (built on first use), or None for engines without a policy."""
    planner = scheduler.__dict__.get(PLANNER_ATTR)
    if planner is None:
        from bebop_vllm.config import options_from_additional_config

        opts = options_from_additional_config(scheduler.vllm_config.additional_config)
        max_k = int(getattr(scheduler, "num_spec_tokens", 0) or 0)
        active = opts is not None and opts.draft_length in ("auto", "entropy") and max_k > 0
        planner = DraftPlanner(opts, scheduler.vllm_config, max_k) if active else False
        setattr(scheduler, PLANNER_ATTR, planner)
    return planner or None


# 1. Plan (both schedulers; AsyncScheduler reaches it through super()).
def _wrap_update_after_schedule(original: Any) -> Any:
    @functools.wraps(original)
    def _update_after_schedule(self: Any, scheduler_output: Any) -> None:
        original(self, scheduler_output)  # sets is_prefill_chunk for this step
        planner = planner_of(self)
        if planner is not None:
            scheduler_output.num_spec_tokens_to_schedule = min(planner.plan(self, scheduler_output),
                                                               planner.max_k)
            setattr(scheduler_output, SCHEDULED_AT_ATTR, time.perf_counter())

    return _update_after_schedule


# 2. Async: per-request placeholder drafts.
def _wrap_async_update_after_schedule(original: Any) -> Any:
    @functools.wraps(original)
    def _update_after_schedule(self: Any, scheduler_output: Any) -> None:
        original(self, scheduler_output)
        planner = planner_of(self)
        if planner is None:
            return
        depths = scheduler_output.num_spec_tokens_to_schedule
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.is_prefill_chunk:
                continue
            k = planner.lengths.get(req_id, depths)
            if k < len(request.spec_token_ids):
                request.spec_token_ids = [-1] * k

    return _update_after_schedule


# 3. Sync: cut each request's drafts to its planned length.
def _wrap_update_draft_token_ids(original: Any) -> Any:
    @functools.wraps(original)
    def update_draft_token_ids(self: Any, draft_token_ids: Any) -> None:
        planner = planner_of(self)
        if planner is not None and draft_token_ids is not None:
            draft_token_ids.draft_token_ids = [
                list(drafts)[: planner.lengths.get(req_id, len(drafts))]
                for req_id, drafts in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids, strict=True)]
        return original(self, draft_token_ids)

    return update_draft_token_ids


# 4. Observe each step's outcome.
def _wrap_update_from_output(original: Any) -> Any:
    @functools.wraps(original)
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        planner = planner_of(self)
        if planner is not None:
            if planner.mode == "auto":
                planner.observe_step_time(scheduler_output, time.perf_counter())
            planner.observe(scheduler_output, model_runner_output)
        result = original(self, scheduler_output, model_runner_output)
        if planner is not None:
            planner.forget_finished(self.requests)
            planner._last_update_end = time.perf_counter()
        return result

    return update_from_output


# 5. Worker: load or calibrate the step-cost model once the KV cache and warm-up are done.
def prepare_step_cost(worker: Any) -> None:
    from bebop_vllm.config import options_from_additional_config

    vllm_config = worker.vllm_config
    opts = options_from_additional_config(vllm_config.additional_config)
    if opts is None or opts.draft_length != "auto" or vllm_config.speculative_config is None:
        return
    from bebop_vllm.step_cost import resolve

    parallel = vllm_config.parallel_config
    single = parallel.tensor_parallel_size * parallel.pipeline_parallel_size * parallel.data_parallel_size == 1
    # Calibrating runs collectives under TP/PP: all ranks would have to agree on every size, so
    # multi-rank engines use a file/cache or the default model (a warning says so).
    resolve(vllm_config, runner=worker.model_runner if single else None)


def _wrap_compile_or_warm_up_model(original: Any) -> Any:
    @functools.wraps(original)
    def compile_or_warm_up_model(self: Any) -> Any:
        result = original(self)
        prepare_step_cost(self)
        return result

    return compile_or_warm_up_model


_SCHED = "vllm.v1.core.sched.scheduler"
UPDATE_AFTER_SCHEDULE = Patch(
    name="draft_length_plan",
    upstream="vllm/v1/core/sched/scheduler.py:1616 Scheduler._update_after_schedule (vLLM 0.32.0)",
    module=_SCHED, owner="Scheduler", attr="_update_after_schedule",
    expected_params=("self", "scheduler_output"), make_replacement=_wrap_update_after_schedule,
)
ASYNC_UPDATE_AFTER_SCHEDULE = Patch(
    name="draft_length_async_placeholders",
    upstream="vllm/v1/core/sched/async_scheduler.py:25 AsyncScheduler._update_after_schedule (vLLM 0.32.0)",
    module="vllm.v1.core.sched.async_scheduler", owner="AsyncScheduler", attr="_update_after_schedule",
    expected_params=("self", "scheduler_output"), make_replacement=_wrap_async_update_after_schedule,
)
UPDATE_DRAFT_TOKEN_IDS = Patch(
    name="draft_length_trim",
    upstream="vllm/v1/core/sched/scheduler.py:2550 Scheduler.update_draft_token_ids (vLLM 0.32.0)",
    module=_SCHED, owner="Scheduler", attr="update_draft_token_ids",
    expected_params=("self", "draft_token_ids"), make_replacement=_wrap_update_draft_token_ids,
)
UPDATE_FROM_OUTPUT = Patch(
    name="draft_length_observe",
    upstream="vllm/v1/core/sched/scheduler.py:2026 Scheduler.update_from_output (vLLM 0.32.0)",
    module=_SCHED, owner="Scheduler", attr="update_from_output",
    expected_params=("self", "scheduler_output", "model_runner_output"), make_replacement=_wrap_update_from_output,
)
GPU_WORKER_WARMUP = Patch(
    name="step_cost_gpu_worker",
    upstream="vllm/v1/worker/gpu_worker.py:908 Worker.compile_or_warm_up_model (vLLM 0.32.0)",
    module="vllm.v1.worker.gpu_worker", owner="Worker", attr="compile_or_warm_up_model",
    expected_params=("self",), make_replacement=_wrap_compile_or_warm_up_model,
)
CPU_WORKER_WARMUP = Patch(
    name="step_cost_cpu_worker",
    upstream="vllm/v1/worker/cpu_worker.py:264 CPUWorker.compile_or_warm_up_model (vLLM 0.32.0)",
    module="vllm.v1.worker.cpu_worker", owner="CPUWorker", attr="compile_or_warm_up_model",
    expected_params=("self",), make_replacement=_wrap_compile_or_warm_up_model,
    applies=on_cpu_host,  # CPUWorker runs only on vLLM's CPU platform
)

DRAFT_LENGTH_PATCHES = [UPDATE_AFTER_SCHEDULE, ASYNC_UPDATE_AFTER_SCHEDULE, UPDATE_DRAFT_TOKEN_IDS,
                        UPDATE_FROM_OUTPUT, GPU_WORKER_WARMUP, CPU_WORKER_WARMUP]
