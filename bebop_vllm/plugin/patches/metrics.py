"""Per-request acceptance + entropy metrics: the vLLM internals they hook (vLLM 0.32.0).

Data flow (vLLM's own path for ``per_request_spec_decode_metrics`` plus entropy):

runner ``_sample`` (entropy per decided draft position, :mod:`..metrics_entropy`)
  → ``sample_tokens`` attaches ``{req_id: [nats...]}`` to the ``ModelRunnerOutput``
  → ``Scheduler.update_from_output`` stages each request's list on its
    :class:`BebopSpecDecodeMetrics`, which vLLM's ``observe`` call then consumes
  → ``EngineCoreOutput.spec_decode_metrics`` (msgspec: must decode as our subclass)
  → ``OutputProcessor.process_outputs`` (Prometheus: :mod:`..metrics_prometheus`)
  → ``CompletionOutput.spec_decode_metrics`` / OpenAI responses (:mod:`.metrics_openai`).

Every hook below is a no-op for engines without ``per_request_spec_decode_metrics``.
"""

from __future__ import annotations

import functools
from typing import Any

from bebop_vllm.plugin.patches.base import Patch, PatchError

# ModelRunnerOutput attribute carrying {req_id: [entropy per decided draft position]}. A plain
# instance attribute: the output is pickled between processes, which keeps it.
ENTROPY_ATTR = "bebop_draft_entropy"
# GPUModelRunner attribute holding the current step's entropies between _sample and sample_tokens.
_STEP_ATTR = "_bebop_step_entropy"
# The same for the draft-length policy's per-request step entropy ({req_id: nats}); attached to the
# output as draft_length.POLICY_ENTROPY_ATTR.
_POLICY_STEP_ATTR = "_bebop_policy_step_entropy"
_CURSOR_ATTR = "_bebop_entropy_cursor"
# GPUModelRunner flag (set by model_runner.install) when the engine's draft-length policy reads entropies.
POLICY_ENTROPY_FLAG = "_bebop_policy_wants_entropy"


def _metrics_level(runner: Any) -> str:
    return runner.vllm_config.observability_config.per_request_spec_decode_metrics


# 1. The scheduler builds our record instead of vLLM's.
def _record_class(original: Any) -> Any:
    from bebop_vllm.plugin.metrics import BebopSpecDecodeMetrics

    if not issubclass(BebopSpecDecodeMetrics, original):
        raise PatchError("BebopSpecDecodeMetrics no longer subclasses vLLM's RequestSpecDecodeMetrics")
    return BebopSpecDecodeMetrics


RECORD_CLASS = Patch(
    name="metrics_record_class",
    upstream="vllm/v1/core/sched/scheduler.py:2636 RequestSpecDecodeMetrics.new(...) in "
    "Scheduler.add_request (class: vllm/v1/metrics/stats.py:350) (vLLM 0.32.0)",
    module="vllm.v1.core.sched.scheduler",
    attr="RequestSpecDecodeMetrics",
    expected_params=("self", "num_spec_tokens", "histogram", "num_draft_tokens",
                     "per_step_accepted", "per_step_drafted"),
    make_replacement=_record_class,
)


# 2. The frontend decodes EngineCoreOutput.spec_decode_metrics as our record (msgspec decodes a
#    dataclass field into its annotated type and drops unknown fields).
class WireTypePatch(Patch):
    """Re-annotate ``EngineCoreOutput.spec_decode_metrics`` with our subclass, then prove it.

    msgspec reads a Struct's annotations once, when the first decoder for it is built, and
    caches them; vLLM builds that decoder after plugins load (engine client start-up). The
    round trip below fails loudly if someone built it earlier or msgspec changed behaviour.
    """

    def apply(self) -> None:
        if self.applied:
            return
        import msgspec
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
        from vllm.v1.metrics.stats import RequestSpecDecodeMetrics

        from bebop_vllm.plugin.metrics import BebopSpecDecodeMetrics

        annotations = EngineCoreOutput.__annotations__
        current = annotations.get(self.attr)
        if current not in (RequestSpecDecodeMetrics | None, BebopSpecDecodeMetrics | None):
            raise PatchError(f"patch {self.name!r}: EngineCoreOutput.{self.attr} is annotated "
                             f"{current!r}; written for {self.upstream}")
        annotations[self.attr] = BebopSpecDecodeMetrics | None
        probe = BebopSpecDecodeMetrics.new(1)
        probe.token_entropies.append(0.5)
        wire = msgspec.msgpack.encode(EngineCoreOutputs(outputs=[
            EngineCoreOutput(request_id="bebop-probe", new_token_ids=[], spec_decode_metrics=probe)]))
        back = msgspec.msgpack.Decoder(EngineCoreOutputs).decode(wire).outputs[0].spec_decode_metrics
        if not isinstance(back, BebopSpecDecodeMetrics) or back.token_entropies != [0.5]:
            raise PatchError(f"patch {self.name!r}: spec_decode_metrics still decodes as "
                             f"{type(back).__name__} (msgspec cached EngineCoreOutput's type "
                             f"before the plugin loaded?); it replaces {self.upstream}")
        self.applied = True


WIRE_TYPE = WireTypePatch(
    name="metrics_wire_type",
    upstream="vllm/v1/engine/__init__.py:237 EngineCoreOutput.spec_decode_metrics annotation "
    "(vLLM 0.32.0)",
    module="vllm.v1.engine",
    owner="EngineCoreOutput",
    attr="spec_decode_metrics",
    make_replacement=lambda original: original,
)


# 3. Runner: entropy of every decided draft position of this verify step (metrics) and each
#    request's step entropy (draft-length policy): one wrapper, one device-to-host transfer.
def _wrap_sample(original: Any) -> Any:
    @functools.wraps(original)
    def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
        want_metrics = spec_decode_metadata is not None and _metrics_level(self) != "none"
        want_policy = bool(getattr(self, POLICY_ENTROPY_FLAG, False)) and logits is not None
        if not (want_metrics or want_policy):
            return original(self, logits, spec_decode_metadata)
        from bebop_vllm.plugin.metrics_entropy import step_entropies

        verifier = self.rejection_sampler
        if getattr(verifier, "last_target_entropy", None) is not None:
            verifier.last_target_entropy = None  # never read a previous step's values
        output = original(self, logits, spec_decode_metadata)
        cursor = self.__dict__.get(_CURSOR_ATTR, 0)
        setattr(self, _CURSOR_ATTR, cursor + 1)
        metrics, policy = step_entropies(verifier, logits, spec_decode_metadata, self.input_batch.sampling_metadata,
                                         output.sampled_token_ids, list(self.input_batch.req_ids),
                                         want_metrics, want_policy, cursor)
        if want_metrics:
            setattr(self, _STEP_ATTR, metrics)
        if want_policy:
            setattr(self, _POLICY_STEP_ATTR, policy)
        return output

    return _sample


RUNNER_SAMPLE = Patch(
    name="metrics_runner_sample",
    upstream="vllm/v1/worker/gpu_model_runner.py:3437 GPUModelRunner._sample (vLLM 0.32.0)",
    module="vllm.v1.worker.gpu_model_runner",
    owner="GPUModelRunner",
    attr="_sample",
    expected_params=("self", "logits", "spec_decode_metadata"),
    make_replacement=_wrap_sample,
)


# 4. Runner: attach the step's entropies to the ModelRunnerOutput it returns.
def _wrap_sample_tokens(original: Any) -> Any:
    @functools.wraps(original)
    def sample_tokens(self: Any, grammar_output: Any) -> Any:
        setattr(self, _STEP_ATTR, None)
        setattr(self, _POLICY_STEP_ATTR, None)
        result = original(self, grammar_output)
        entropies = self.__dict__.pop(_STEP_ATTR, None)
        policy = self.__dict__.pop(_POLICY_STEP_ATTR, None)
        if entropies or policy:
            from vllm.v1.outputs import ModelRunnerOutput

            from bebop_vllm.plugin.patches.draft_length import POLICY_ENTROPY_ATTR

            # Async scheduling wraps the output (AsyncGPUModelRunnerOutput._model_runner_output).
            target = getattr(result, "_model_runner_output", result)
            if isinstance(target, ModelRunnerOutput):
                if entropies:
                    setattr(target, ENTROPY_ATTR, entropies)
                if policy:
                    setattr(target, POLICY_ENTROPY_ATTR, policy)
        return result

    return sample_tokens


RUNNER_OUTPUT = Patch(
    name="metrics_runner_output",
    upstream="vllm/v1/worker/gpu_model_runner.py:4304 GPUModelRunner.sample_tokens (vLLM 0.32.0)",
    module="vllm.v1.worker.gpu_model_runner",
    owner="GPUModelRunner",
    attr="sample_tokens",
    expected_params=("self", "grammar_output"),
    make_replacement=_wrap_sample_tokens,
)


# 5. Scheduler: hand each request its entropies right before vLLM observes the same step.
def _wrap_update_from_output(original: Any) -> Any:
    @functools.wraps(original)
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        entropies = getattr(model_runner_output, ENTROPY_ATTR, None)
        if entropies:
            for req_id, values in entropies.items():
                request = self.requests.get(req_id)
                record = getattr(request, "spec_decode_metrics", None)
                if record is not None and hasattr(record, "stage_entropy"):
                    record.stage_entropy(values)
        return original(self, scheduler_output, model_runner_output)

    return update_from_output


SCHEDULER_UPDATE = Patch(
    name="metrics_scheduler_update",
    upstream="vllm/v1/core/sched/scheduler.py:2026 Scheduler.update_from_output (observe at "
    ":2145) (vLLM 0.32.0)",
    module="vllm.v1.core.sched.scheduler",
    owner="Scheduler",
    attr="update_from_output",
    expected_params=("self", "scheduler_output", "model_runner_output"),
    make_replacement=_wrap_update_from_output,
)


# 6. Frontend: every finished sequence's record feeds bebop's Prometheus metrics.
def _wrap_process_outputs(original: Any) -> Any:
    @functools.wraps(original)
    def process_outputs(self: Any, engine_core_outputs: Any, engine_core_timestamp: Any = None,
                        iteration_stats: Any = None, weight_version: Any = None) -> Any:
        from bebop_vllm.plugin.metrics_prometheus import observe_finished

        for output in engine_core_outputs:
            if output.spec_decode_metrics is not None and output.finish_reason is not None:
                observe_finished(output.spec_decode_metrics)
        return original(self, engine_core_outputs, engine_core_timestamp, iteration_stats,
                        weight_version)

    return process_outputs


FRONTEND_PROMETHEUS = Patch(
    name="metrics_frontend_prometheus",
    upstream="vllm/v1/engine/output_processor.py:681 OutputProcessor.process_outputs (vLLM 0.32.0)",
    module="vllm.v1.engine.output_processor",
    owner="OutputProcessor",
    attr="process_outputs",
    expected_params=("self", "engine_core_outputs", "engine_core_timestamp", "iteration_stats",
                     "weight_version"),
    make_replacement=_wrap_process_outputs,
)


METRICS_PATCHES: list[Patch] = [
    RECORD_CLASS,
    WIRE_TYPE,
    RUNNER_SAMPLE,
    RUNNER_OUTPUT,
    SCHEDULER_UPDATE,
    FRONTEND_PROMETHEUS,
]
