"""Seeded requests with a chunked prefill on CPU: keep their generator untouched (bebop engines only).

A request whose prefill is split over several steps is sampled at every partial chunk too, and
the token is thrown away (``discard_request_mask``). vLLM 0.32 then rewinds the request's seeded
generator so the discarded draw leaves no trace: ``GPUModelRunner._bookkeeping_sync``
(vllm/v1/worker/gpu_model_runner.py:3468, rewind at :3499-3502, vLLM 0.32.0) calls
``gen.set_offset(gen.get_offset() - 4)``. That works for CUDA's Philox generators; a CPU
generator (Mersenne Twister) has no offset and raises "CPU Generator does not use offset", which
kills the engine and every request in it. Measured on a plain vLLM 0.32 CPU engine too
(`SamplingParams(seed=1)`, a 600-token prompt, ``max_num_batched_tokens=256``): it is vLLM's bug,
not bebop's.

On bebop engines on CPU we wrap ``GPUModelRunner.sample_tokens`` (:4304): for the step's
discarded requests the seeded generator is taken out of the batch's ``generators`` dict (the
object the sampler, the verifier and bebop's draft sampler read) before sampling and put back
after. Their discarded draws then come from the unseeded source, the generator is left exactly
where the previous step left it (what upstream's rewind intends, and also for the drafter's and
the verifier's draws, which the fixed "- 4" does not cover), and the rewind loop finds no
generator. Plain engines are left as vLLM built them (they still crash); on CUDA nothing
changes.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from bebop_vllm.plugin.patches.base import Patch, on_cpu_host

UPSTREAM = (
    "vllm/v1/worker/gpu_model_runner.py:4304 GPUModelRunner.sample_tokens; the rewind it avoids is "
    "_bookkeeping_sync :3499-3502 (vLLM 0.32.0)"
)
# Set on the runner by the model_runner patch for bebop engines on CPU.
BEBOP_FLAG = "_bebop_cpu_seeded_chunks"


def held_out_generators(discard_mask: np.ndarray, generators: dict[int, Any]) -> dict[int, Any]:
    """Remove and return the generators of the rows whose sampled token is discarded this step.

    ``discard_mask [num_reqs]`` bool (the runner's ``discard_request_mask.np[:num_reqs]``),
    ``generators`` row index -> torch.Generator (modified in place).
    """
    rows = [int(i) for i in np.flatnonzero(discard_mask)]
    return {i: generators.pop(i) for i in rows if i in generators}


def _make_replacement(original: Any) -> Any:
    @functools.wraps(original)
    def sample_tokens(self: Any, grammar_output: Any) -> Any:
        generators = self.input_batch.generators
        if not getattr(self, BEBOP_FLAG, False) or self.execute_model_state is None or not generators:
            return original(self, grammar_output)
        held = held_out_generators(self.discard_request_mask.np[: self.input_batch.num_reqs], generators)
        try:
            return original(self, grammar_output)
        finally:
            generators.update(held)

    return sample_tokens


PATCH = Patch(
    name="cpu_seeded_chunks",
    upstream=UPSTREAM,
    module="vllm.v1.worker.gpu_model_runner",
    owner="GPUModelRunner",
    attr="sample_tokens",
    expected_params=("self", "grammar_output"),
    make_replacement=_make_replacement,
    applies=on_cpu_host,
)
