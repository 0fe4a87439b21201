"""Chain speculative sampling in vectorised torch: the CPU production path and the reference.

No Python loop over requests or positions: per-position acceptance is one gather, the first
rejection per request is one ``scatter_reduce``, and only the one row per request that emits
a sampled token (residual at the first rejection, or the bonus row) is processed at full
vocabulary width.
"""

from __future__ import annotations

import torch
from bebop_vllm.kernels.inverse_cdf import sample_inverse_cdf
from bebop_vllm.kernels.layout import RaggedLayout
from bebop_vllm.kernels.prob_math import residual_weights
from bebop_vllm.kernels.random_numbers import RejectionUniforms

PLACEHOLDER_TOKEN_ID = -1


def valid_draft_mask(draft_token_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid bool [Nd], safe_ids int64 [Nd])`` for draft ids ``[Nd]``.

    vLLM pads drafts that a grammar rejected with -1 (``PLACEHOLDER_TOKEN_ID``) and its
    verifier rejects them at their position. Any id outside ``[0, V)`` is treated that way
    here: it is rejected, and ``safe_ids`` (the id, or 0 where invalid) is what gets used as
    an index, so an invalid id is never read through.
    """
    ids = draft_token_ids.long()
    valid = (ids >= 0) & (ids < vocab_size)
    return valid, torch.where(valid, ids, torch.zeros_like(ids))


def accept_draft_tokens(
    p_at_draft: torch.Tensor, q_at_draft: torch.Tensor | None, u: torch.Tensor
) -> torch.Tensor:
    """Accept draft x with probability min(1, p(x)/q(x)): ``[Nd]`` f32, ``[Nd]`` f32|None, f64 -> bool.

    One-hot drafts (``q_at_draft is None``) accept iff ``u < p(x)``. A draft with q(x) = 0
    (impossible for a token actually drawn from q) is rejected, as vLLM does. The ratio is
    formed in float32 and compared in float64, exactly as the Triton kernel does.
    """
    if q_at_draft is None:
        return u < p_at_draft.double()
    ratio = p_at_draft / q_at_draft
    return (q_at_draft > 0) & (u < ratio.double())


def count_accepted(accepted: torch.Tensor, layout: RaggedLayout) -> torch.Tensor:
    """Accepted drafts before each request's first rejection: bool ``[Nd]`` -> int64 ``[B]``."""
    rejected_depth = torch.where(
        accepted, layout.num_draft_tokens[layout.request_of_draft], layout.position_of_draft
    )
    return layout.num_draft_tokens.clone().scatter_reduce_(
        0, layout.request_of_draft, rejected_depth, reduce="amin", include_self=True
    )


def emitted_weights(
    p_final: torch.Tensor,
    rejected: torch.Tensor,
    rejected_draft_index: torch.Tensor,
    safe_draft_ids: torch.Tensor,
    valid_draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
) -> torch.Tensor:
    """Unnormalised weights of the token each request emits after its accepted drafts.

    Rejected requests: max(p - q, 0) at the rejected position (one-hot q puts all its mass
    on the rejected draft token, so that token's weight becomes 0; an invalid draft id, one
    hot on no token, removes nothing, as in vLLM). Others: the bonus row p.
    ``p_final [B, V]`` (a copy this function may overwrite) is the target row at that
    position; ``rejected_draft_index [B]`` the rejected draft position (any valid index
    where nothing was rejected); ``safe_draft_ids / valid_draft [Nd]`` from
    ``valid_draft_mask``. Returns ``[B, V]``; the inverse-CDF sampler is scale invariant, so
    the normalisation of ``residual_distribution`` is skipped.
    """
    if draft_probs is None:
        rejected_token = safe_draft_ids[rejected_draft_index].unsqueeze(-1)
        remove = (rejected & valid_draft[rejected_draft_index]).unsqueeze(-1)
        at_token = p_final.gather(1, rejected_token)
        return p_final.scatter_(1, rejected_token, torch.where(remove, torch.zeros_like(at_token), at_token))
    q_final = draft_probs[rejected_draft_index].float()
    q_final.mul_(rejected.unsqueeze(-1))  # no draft mass to remove from bonus rows
    return residual_weights(p_final, q_final)


def assemble_output(
    draft_token_ids: torch.Tensor,
    num_accepted: torch.Tensor,
    final_token: torch.Tensor,
    layout: RaggedLayout,
) -> torch.Tensor:
    """int32 ``[B, max_k + 1]``: accepted drafts, then the final token, then -1 padding."""
    batch, width = layout.batch_size, layout.max_num_draft_tokens + 1
    device = draft_token_ids.device
    # One spare column receives the drafts that were not accepted, so no boolean indexing
    # (and no device->host sync) is needed to drop them.
    output = torch.full((batch, width + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
    kept = layout.position_of_draft < num_accepted[layout.request_of_draft]
    column = torch.where(kept, layout.position_of_draft, torch.full_like(layout.position_of_draft, width))
    output[layout.request_of_draft, column] = draft_token_ids.to(torch.int32)
    output[torch.arange(batch, device=device), num_accepted] = final_token.to(torch.int32)
    return output[:, :width].contiguous()


def rejection_sample_torch(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    layout: RaggedLayout,
    draft_probs: torch.Tensor | None,
    uniforms: RejectionUniforms,
    *,
    greedy_request: torch.Tensor | None = None,
    row_argmax: torch.Tensor | None = None,
    bonus_argmax: torch.Tensor | None = None,
    bonus_token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rejection sampling on probabilities.

    Shapes: ``target_probs [N, V]`` f32 (N = sum(k_i + 1) with bonus rows, else Nd: see
    ``layout.has_bonus_rows``), ``draft_token_ids [Nd]`` (ids outside [0, V), e.g. vLLM's -1
    padding, are rejected at their position), ``draft_probs [Nd, V]`` or None (one-hot
    drafts), uniforms ``[Nd]`` / ``[B]`` f64. ``bonus_token_ids [B]`` (required without bonus
    rows, else unused): the token a request emits when all its drafts are accepted.
    Mixed greedy batches (the logits entry): ``greedy_request [B]`` bool, ``row_argmax [N]``
    (argmax of each processed target row) and, with bonus rows, ``bonus_argmax [B]`` (argmax
    of the raw bonus row, as vLLM's greedy bonus sampler uses); greedy requests accept while
    draft == argmax. Returns ``(output_token_ids int32 [B, max_k + 1], num_accepted int32 [B])``.
    """
    has_bonus_rows = layout.has_bonus_rows
    if not has_bonus_rows and bonus_token_ids is None:
        raise ValueError("target rows without bonus rows need bonus_token_ids")
    vocab = target_probs.shape[1]
    valid, safe_ids = valid_draft_mask(draft_token_ids, vocab)
    p_at_draft = target_probs[layout.row_of_draft, safe_ids].float()
    q_at_draft = None
    if draft_probs is not None:
        draft_rows = torch.arange(safe_ids.shape[0], device=safe_ids.device)
        q_at_draft = draft_probs[draft_rows, safe_ids].float()
    accepted = accept_draft_tokens(p_at_draft, q_at_draft, uniforms.accept)
    if greedy_request is not None:
        assert row_argmax is not None and (bonus_argmax is not None or not has_bonus_rows)
        greedy_accept = safe_ids == row_argmax[layout.row_of_draft]
        accepted = torch.where(greedy_request[layout.request_of_draft], greedy_accept, accepted)
    accepted &= valid

    num_accepted = count_accepted(accepted, layout)
    rejected = num_accepted < layout.num_draft_tokens
    total_draft = layout.total_draft_tokens
    # Without bonus rows a request that accepted everything has no row to sample from: clamp
    # its index to any existing row (its sampled token is discarded for the bonus id below).
    final_row = layout.row_start + num_accepted
    if not has_bonus_rows:
        final_row = final_row.clamp(max=max(total_draft - 1, 0))
    rejected_draft_index = (layout.draft_start + num_accepted).clamp(max=max(total_draft - 1, 0))
    if target_probs.shape[0] == 0:
        final_token = torch.zeros(layout.batch_size, dtype=torch.int64, device=target_probs.device)
    else:
        p_final = target_probs[final_row].float()
        if total_draft:
            weights = emitted_weights(p_final, rejected, rejected_draft_index, safe_ids, valid, draft_probs)
            # p == q up to rounding: the rejection had probability 0; emit from p, as
            # prob_math.residual_distribution (and the Triton kernel) do.
            empty = weights.sum(dim=-1) == 0
            if bool(empty.any()):
                weights[empty] = target_probs[final_row[empty]].float()
        else:
            weights = p_final
        final_token = sample_inverse_cdf(weights, uniforms.final)
    if greedy_request is not None and target_probs.shape[0]:
        greedy_token = row_argmax[final_row]
        if has_bonus_rows:
            greedy_token = torch.where(rejected, greedy_token, bonus_argmax)
        final_token = torch.where(greedy_request, greedy_token, final_token)
    if not has_bonus_rows:
        final_token = torch.where(rejected, final_token, bonus_token_ids.reshape(-1).to(final_token.dtype))
    output = assemble_output(draft_token_ids, num_accepted, final_token, layout)
    return output, num_accepted.to(torch.int32)
