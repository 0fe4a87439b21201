"""A proposer pass that drafts nothing computes nothing: its KV-cache write is deferred.

With ``draft_length="auto"`` a crowded batch drafts nothing (K = 0), and vLLM's EAGLE proposer
then still runs its first pass over the step's tokens, only to keep the drafter's KV cache
complete (llm_base_proposer.py:617): its input bookkeeping, attention metadata and a full
decoder layer whose outputs are discarded. This wraps ``SpecDecodeBaseProposer.propose``
(vllm/v1/spec_decode/llm_base_proposer.py:512, vLLM 0.32.0) so that, for bebop's heads only and
only when K = 0:

- **deferred** (the default where it applies): the pass is not run. Its inputs (the drafter's
  input ids as ``set_inputs_first_pass``'s default EAGLE pathway builds them, lines 834-854:
  target tokens shifted by one with each request's sampled token last; positions; the target
  states; the slot mapping) go to :class:`~bebop_vllm.plugin.deferred_kv.PendingDraftKV`, and
  the next pass with K > 0 first writes them all in one batched KV-only pass
  (:meth:`BebopMTPModel.flush_deferred_kv`). Applies where the proposer takes that default
  pathway (no extra input slots, no M-RoPE, no vocabulary mapping);
- **KV-only** otherwise: the head runs :meth:`BebopHeadModel.write_kv_cache` (embed, fc, input
  norm, qkv, rotary, cache write) instead of the layer.

Every other proposer and every K > 0 pass is untouched. Neither applies where the drafter may
replay a CUDA graph (a captured graph would not see the switch) or where the attention backend
writes the cache inside its forward. In a compiled engine the full pass is Inductor's fused code
while the KV-only write stays eager, so the caches agree to float rounding rather than bit for
bit (tests/test_draft_kv_only.py checks the bits on an eager engine); a difference there could
only move acceptance, never exactness. ``BEBOP_DEFER_DRAFT_KV=0`` switches deferral off (the
KV-only pass every step), for A/B measurements.

Wraps the ``aux_features`` patch's wrapper (applied before this one), so a deferred pass holds
the raw captured states and the flush combines them, batched.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch

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


def defers_kv_writes(proposer: Any, head: Any) -> bool:
    """Whether a K = 0 pass of ``proposer`` may be deferred (cached on the head)."""
    cached = getattr(head, "_bebop_defer_kv_ok", None)
    if cached is None:
        cached = head._bebop_defer_kv_ok = (
            os.environ.get("BEBOP_DEFER_DRAFT_KV", "1") != "0"
            # set_inputs_first_pass's default pathway, which _defer mirrors
            and not getattr(proposer, "needs_extra_input_slots", True)
            and not getattr(proposer, "use_heterogeneous_vocab", True)
            and not getattr(proposer, "uses_mrope", True)
            and not getattr(proposer, "_share_mtp_indices", True)
            and getattr(proposer, "eplb_state", None) is None
        )
    return bool(cached)


def _defer(proposer: Any, bound: dict[str, Any]) -> torch.Tensor:
    """Hold a K = 0 pass's inputs on the drafter; returns what upstream's K = 0 pass returns."""
    target_token_ids = bound["target_token_ids"]
    cad = bound["common_attn_metadata"]
    indices = bound.get("token_indices_to_sample")
    if indices is None:
        indices = cad.query_start_loc[1:] - 1
    n = target_token_ids.shape[0]
    # set_inputs_first_pass (llm_base_proposer.py:843-847), in the proposer's own buffer as there:
    # shift by one, each request's sampled token last. A row past a request's sampled token (a
    # rejected draft's position) keeps the buffer's stale id there too; its slot is rewritten
    # once the accepted token reaches that position, and nothing attends to it before.
    input_ids = proposer.input_ids
    input_ids[: n - 1] = target_token_ids[1:]
    input_ids[indices] = bound["next_token_ids"]
    proposer.model.defer_kv_write(input_ids[:n], bound["target_positions"][:n], bound["target_hidden_states"][:n],
                                  cad.slot_mapping[:n])
    proposer.num_speculative_tokens = 0
    proposer._last_draft_probs = None
    return torch.empty(cad.batch_size(), 0, device=target_token_ids.device, dtype=torch.int64)


def _make_replacement(original: Any) -> Any:
    params = list(inspect.signature(original).parameters)[1:]  # without self
    k_position = params.index("num_speculative_tokens")

    @functools.wraps(original)
    def propose(self: Any, *args: Any, **kwargs: Any) -> Any:
        k = kwargs["num_speculative_tokens"] if "num_speculative_tokens" in kwargs else args[k_position]
        head = bebop_head(self)
        if head is None:
            return original(self, *args, **kwargs)
        if k > 0:  # this pass reads the drafter's cache: write what K = 0 passes held first
            self.model.flush_deferred_kv()
            return original(self, *args, **kwargs)
        if defers_kv_writes(self, head):
            return _defer(self, {**dict(zip(params, args, strict=False)), **kwargs})  # args may stop early
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
