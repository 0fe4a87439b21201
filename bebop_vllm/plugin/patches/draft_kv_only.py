"""A proposer pass that drafts nothing writes the drafter's KV cache and computes nothing else.

With ``draft_length="auto"`` a crowded batch drafts nothing (K = 0), and vLLM's EAGLE proposer
then still runs its first pass over the step's tokens, only to keep the drafter's KV cache
complete (llm_base_proposer.py:617): a full decoder layer whose outputs are discarded, ~5 % of a
plain step with SmolLM2-135M on CPU. This wraps ``SpecDecodeBaseProposer.propose``
(vllm/v1/spec_decode/llm_base_proposer.py:512, vLLM 0.32.0) so that, for bebop's heads only and
only when K = 0, the head runs :meth:`BebopHeadModel.write_kv_cache` (embed, fc, input norm,
qkv, rotary, cache write) instead of the layer. Every other proposer and every K > 0 pass is
untouched. Not used where the drafter may replay a CUDA graph (a captured graph would not see
the switch) or where the attention backend writes the cache inside its forward. In a compiled
engine the full pass is Inductor's fused code while the KV-only pass stays eager, so the two
caches agree to float rounding rather than bit for bit (tests/test_draft_kv_only.py checks the
bits on an eager engine); a difference there could only move acceptance, never exactness.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from bebop_vllm.plugin.patches.base import Patch

UPSTREAM = "vllm/v1/spec_decode/llm_base_proposer.py:512 SpecDecodeBaseProposer.propose (vLLM 0.32.0)"


def bebop_head(proposer: Any) -> Any:
    """The proposer's :class:`BebopHeadModel` when a K = 0 pass may run KV-only, else None."""
    from bebop_vllm.plugin.draft_model import BebopMTPModel

    model = getattr(proposer, "model", None)
    if not isinstance(model, BebopMTPModel):  # other methods, or a CUDA-graph wrapper
        return None
    head = model.model
    cached = getattr(head, "_bebop_kv_only_ok", None)
    if cached is None:
        cached = head._bebop_kv_only_ok = bool(head.supports_kv_only())
    return head if cached else None


def _make_replacement(original: Any) -> Any:
    params = list(inspect.signature(original).parameters)
    k_position = params.index("num_speculative_tokens") - 1  # without self

    @functools.wraps(original)
    def propose(self: Any, *args: Any, **kwargs: Any) -> Any:
        k = kwargs["num_speculative_tokens"] if "num_speculative_tokens" in kwargs else args[k_position]
        head = bebop_head(self) if k == 0 else None
        if head is None:
            return original(self, *args, **kwargs)
        head.kv_only = True
        try:
            return original(self, *args, **kwargs)
        finally:
            head.kv_only = False

    return propose


# SpecDecodeBaseProposer.propose's parameters (vLLM 0.32.0); the aux_features patch wraps it too.
PROPOSE_PARAMS = ("self", "num_speculative_tokens", "target_token_ids", "target_positions", "target_hidden_states",
                  "next_token_ids", "token_indices_to_sample", "common_attn_metadata", "sampling_metadata",
                  "mm_embed_inputs", "num_rejected_tokens_gpu", "slot_mappings")

PATCH = Patch(
    name="draft_kv_only",
    upstream=UPSTREAM,
    module="vllm.v1.spec_decode.llm_base_proposer",
    owner="SpecDecodeBaseProposer",
    attr="propose",
    expected_params=PROPOSE_PARAMS,
    make_replacement=_make_replacement,
)
