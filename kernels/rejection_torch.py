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
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
) -> torch.Tensor:
    """Unnormalised weights of the token each request emits after its accepted drafts.

    Rejected requests: max(p - q, 0) at the rejected position (one-hot q puts all its mass
    on the rejected draft token, so that token's weight becomes 0). Others: the bonus row p.
    ``p_final [B, V]`` (a copy this function may overwrite) is the target row at that
    position; ``rejected_draft_index [B]`` the rejected draft position (any valid index
    where nothing was rejected). Returns ``[B, V]``; the inverse-CDF sampler is scale
    invariant, so the normalisation of ``residual_distribution`` is skipped.
    """
    if draft_probs is None:
        rejected_token = draft_token_ids.long()[rejected_draft_index].unsqueeze(-1)
        kept = p_final.gather(1, rejected_token) * (~rejected).unsqueeze(-1)
        return p_final.scatter_(1, rejected_token, kept)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rejection sampling on probabilities.

    Shapes: ``target_probs [N, V]`` f32 (N = sum(k_i + 1)), ``draft_token_ids [Nd]``,
    ``draft_probs [Nd, V]`` or None (one-hot drafts), uniforms ``[Nd]`` / ``[B]`` f64.
    Mixed greedy batches (the logits entry): ``greedy_request [B]`` bool, ``row_argmax [N]``
    (argmax of each processed target row) and ``bonus_argmax [B]`` (argmax of the raw bonus
    row, as vLLM's greedy bonus sampler uses); greedy requests accept while draft == argmax.
    Returns ``(output_token_ids int32 [B, max_k + 1], num_accepted int32 [B])``.
    """
    batch = layout.batch_size
    draft_ids = draft_token_ids.long()
    p_at_draft = target_probs[layout.row_of_draft, draft_ids].float()
    q_at_draft = None
    if draft_probs is not None:
        draft_rows = torch.arange(draft_ids.shape[0], device=draft_ids.device)
        q_at_draft = draft_probs[draft_rows, draft_ids].float()
    accepted = accept_draft_tokens(p_at_draft, q_at_draft, uniforms.accept)
    if greedy_request is not None:
        assert row_argmax is not None and bonus_argmax is not None
        greedy_accept = draft_ids == row_argmax[layout.row_of_draft]
        accepted = torch.where(greedy_request[layout.request_of_draft], greedy_accept, accepted)

    num_accepted = count_accepted(accepted, layout)
    rejected = num_accepted < layout.num_draft_tokens
    final_row = layout.row_start + num_accepted
    rejected_draft_index = (layout.draft_start + num_accepted).clamp(
        max=max(layout.total_draft_tokens - 1, 0)
    )
    p_final = target_probs[final_row].float()
    if layout.total_draft_tokens:
        weights = emitted_weights(
            p_final, rejected, rejected_draft_index, draft_token_ids, draft_probs
        )
        # p == q up to rounding: the rejection had probability 0; emit from p, as
        # prob_math.residual_distribution (and the Triton kernel) do.
        empty = weights.sum(dim=-1) == 0
        if bool(empty.any()):
            weights[empty] = target_probs[final_row[empty]].float()
    else:
        weights = p_final
    final_token = sample_inverse_cdf(weights, uniforms.final)
    if greedy_request is not None:
        greedy_token = torch.where(rejected, row_argmax[final_row], bonus_argmax)
        final_token = torch.where(greedy_request, greedy_token, final_token)
    output = assemble_output(draft_token_ids, num_accepted, final_token, layout)
    return output, num_accepted.to(torch.int32)[:batch]
