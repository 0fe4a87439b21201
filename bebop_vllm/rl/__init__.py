"""RL rollouts with frozen bebop heads (issue 13): ``RolloutEngine``, ``AcceptanceMonitor``, a GRPO loop.

Importing this package does not import vLLM; :class:`RolloutEngine` does when it is built.
docs/rl.md explains the design and how to run it under other RL frameworks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bebop_vllm.rl.monitor import AcceptanceFit, AcceptanceMonitor, Crossover, StepReport
from bebop_vllm.rl.stats import RolloutStats, SequenceRecord, rollout_stats
from bebop_vllm.rl.weights import PolicyWeightsError

if TYPE_CHECKING:
    from bebop_vllm.rl.engine import PolicyUpdate, RolloutEngine, RolloutEngineError

__all__ = [
    "AcceptanceFit",
    "AcceptanceMonitor",
    "Crossover",
    "PolicyUpdate",
    "PolicyWeightsError",
    "RolloutEngine",
    "RolloutEngineError",
    "RolloutStats",
    "SequenceRecord",
    "StepReport",
    "invalidate_draft_caches",
    "rollout_stats",
]


def __getattr__(name: str) -> Any:
    if name in ("RolloutEngine", "RolloutEngineError", "PolicyUpdate"):
        from bebop_vllm.rl import engine

        return getattr(engine, name)
    raise AttributeError(name)


def invalidate_draft_caches(llm: Any) -> None:
    """For code that loads policy weights into a bebop ``vllm.LLM`` itself (TRL-style
    ``model.load_weights``, vLLM's NCCL/IPC weight transfer): drop the drafter's caches derived from
    the lm_head, in every worker. Uses RolloutEngine's worker extension when the engine has it; else
    sends a function, which crosses vLLM's engine-core process boundary only in-process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, TRL colocate) or with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``."""
    from bebop_vllm.rl.engine import WORKER_EXTENSION

    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    if getattr(getattr(config, "parallel_config", None), "worker_extension_cls", None) == WORKER_EXTENSION:
        llm.collective_rpc("bebop_invalidate_draft_caches")
        return

    def _invalidate(worker: Any) -> None:
        draft = worker.get_draft_model()
        if draft is not None and hasattr(draft, "invalidate_weight_caches"):
            draft.invalidate_weight_caches()

    llm.collective_rpc(_invalidate)
