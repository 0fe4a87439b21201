"""Every vLLM internal bebop replaces, in one list that ``register()`` applies once per process.

Each entry is a :class:`~bebop_vllm.plugin.patches.base.Patch`: it names the upstream
function it replaces (``file:line`` in vLLM 0.32.0), checks the target still looks the way it
did when the patch was written, and fails loudly otherwise.

To add a patch: write one module here that defines ``PATCH = Patch(...)`` (import vLLM only
inside ``make_replacement`` / at apply time, so importing this package stays cheap) and
append it to ``PATCHES`` below. Order matters only where noted.
"""

from __future__ import annotations

from bebop_vllm.plugin.patches import (
    aux_features,
    cpu_block_size,
    cpu_expand_fix,
    cpu_seeded_chunks,
    draft_kv_only,
    draft_length,
    draft_sampling,
    metrics,
    metrics_openai,
    model_runner,
    runner_v2_guard,
    speculative_config,
)
from bebop_vllm.plugin.patches.base import Patch, PatchError

PATCHES: list[Patch] = [
    speculative_config.PATCH,  # method "bebop" -> eagle + options in additional_config
    runner_v2_guard.PATCH,  # bebop engines run on the V1 model runner (GPU)
    cpu_expand_fix.PATCH,  # CPU: per-token temperature/top-k/top-p were uninitialised memory
    cpu_block_size.PATCH,  # CPU: 32-token KV blocks (prefix-cache hits are reused one block short)
    draft_sampling.PATCH,  # probabilistic drafts from the request's own distribution
    aux_features.PATCH,  # heads with aux layers: combine the captured target states (before draft_kv_only)
    draft_kv_only.PATCH,  # a K = 0 proposer pass is deferred (or only writes the heads' KV cache)
    model_runner.PATCH,  # install BebopRejectionSampler / drafting flag in the V1 runner
    cpu_seeded_chunks.PATCH,  # CPU: a seeded request's chunked prefill no longer kills the engine
    *metrics.METRICS_PATCHES,  # per-request acceptance + entropy (LLM outputs, OpenAI, /metrics)
    *metrics_openai.OPENAI_PATCHES,  # the same metrics on every OpenAI choice (n > 1, streaming)
    # draft_length "auto"/"entropy": per-request draft counts planned in the scheduler, step-cost
    # calibration in the worker (the runner's entropies come from the metrics _sample wrapper)
    *draft_length.DRAFT_LENGTH_PATCHES,
]

__all__ = ["PATCHES", "Patch", "PatchError"]
