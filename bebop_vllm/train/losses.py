"""Head-training losses over draft logits ``[N, g, V]`` and target probabilities ``[N, g, V]``.

Row n is one draft chain, column j its depth j + 1; ``target_probs`` is stop-gradient (the
frozen target's tempered distribution i positions ahead) and ``mask`` [N, g] is False where the
chain runs past the end of its sequence. Math: docs/design.md#the-math.

Memory: the vocabulary math runs over row chunks of ``CHUNK_ROWS`` rows per depth; the
acceptance rate's and the forward KL's forwards hold a few [chunk, V] fp32 temporaries and their
backwards recompute q per chunk (closed-form gradients, no softmax kept for autograd); CE chunks
run under activation checkpointing, so their softmax is recomputed chunk by chunk too. Only the
inputs and the gradient of ``draft_logits`` are ever full size.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from bebop_vllm.kernels import acceptance_rate

CHUNK_ROWS = 256
HYBRID_ETA = 3.0


def _row_chunks(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def _blocks(n: int, depths: int, chunk: int) -> list[tuple[slice, int]]:
    """(rows, depth) blocks of an [N, g, V] tensor: ``chunk`` rows of one depth at a time."""
    return [(rows, j) for j in range(depths) for rows in _row_chunks(n, chunk)]


class _BlockwiseRowFunction(torch.autograd.Function):
    """A per-row function of the logits f(z, p) -> [N, g] with a closed-form gradient, run on
    the whole [N, g, V] tensor block by block (``chunk`` rows of one depth): nothing [N, g, V]
    is kept but the inputs, q is recomputed in the backward, and the gradient is written in
    place (selecting depth columns under autograd would zero-fill an [N, g, V] gradient per
    depth). ``value(z, p)`` -> [rows] and ``grad(z, p)`` -> [rows, V] (d f / d z) take one
    block's logits and fp32 target probabilities."""

    @staticmethod
    def forward(ctx, logits, target_probs, chunk, value, grad):  # type: ignore[override]  # noqa: ANN001, ANN205
        ctx.save_for_backward(logits, target_probs)
        ctx.chunk, ctx.grad_fn = chunk, grad
        out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
        for rows, j in _blocks(logits.shape[0], logits.shape[1], chunk):
            out[rows, j] = value(logits[rows, j], target_probs[rows, j].float())
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]  # noqa: ANN001, ANN205
        logits, target_probs = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows, j in _blocks(logits.shape[0], logits.shape[1], ctx.chunk):
            g = ctx.grad_fn(logits[rows, j], target_probs[rows, j].float())
            grad[rows, j] = g.mul_(grad_out[rows, j, None]).to(grad.dtype)
        return grad, None, None, None, None


def _alpha_value(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return acceptance_rate(p, torch.softmax(z, dim=-1, dtype=torch.float32))


def _alpha_grad(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """d alpha / d z_v = q_v (1[q_v <= p_v] - S), S = sum_{u: q_u <= p_u} q_u: no division, so
    finite even where alpha = 0."""
    q = torch.softmax(z, dim=-1, dtype=torch.float32)
    below = q <= p
    s = torch.where(below, q, 0.0).sum(-1, keepdim=True)
    return q.mul_(below.to(q.dtype).sub_(s))


def _kl_value(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v); 0 log 0 = 0 via the clamp (xlogy is ~5x slower
    on a CPU)."""
    logp = p.clamp_min(torch.finfo(torch.float32).tiny).log_()
    return (p * (logp - torch.log_softmax(z, dim=-1, dtype=torch.float32))).sum(-1)


def _kl_grad(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """d KL / d z_v = q_v sum(p) - p_v (p may sum to less than 1: p restricted to a draft vocabulary)."""
    q = torch.softmax(z, dim=-1, dtype=torch.float32)
    return q.mul_(p.sum(-1, keepdim=True)).sub_(p)


def acceptance_rates(draft_logits: torch.Tensor, target_probs: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """One-step acceptance alpha [N, g] = sum_v min(p, softmax(z)), differentiable in the logits."""
    _check(draft_logits, target_probs)
    return _BlockwiseRowFunction.apply(draft_logits, target_probs.detach(), chunk, _alpha_value, _alpha_grad)


def _check(draft_logits: torch.Tensor, target_probs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    if draft_logits.dim() != 3 or draft_logits.shape != target_probs.shape:
        raise ValueError(
            f"draft_logits and target_probs must both be [N, g, V]; got {tuple(draft_logits.shape)} "
            f"and {tuple(target_probs.shape)}"
        )
    if mask is not None and tuple(mask.shape) != tuple(draft_logits.shape[:2]):
        raise ValueError(f"mask must be [N, g] = {tuple(draft_logits.shape[:2])}, got {tuple(mask.shape)}")


def _full_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, depth_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` [N, g] over True entries of ``mask``, each weighted by its depth's
    ``depth_weights`` [g] (default 1) (0 if there are none, keeping the graph)."""
    w = mask.to(values.dtype) if depth_weights is None else mask * depth_weights.to(values)
    return (torch.where(mask, values, 0.0) * w).sum() / w.sum().clamp_min(1e-12)


def e2e_tv_loss(
    draft_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    depth_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """End-to-end TV loss (paper Eq. 13): mean over chains of 1 - (1/g) sum_j prod_{i<=j} alpha_i.

    Masked positions count as alpha = 0 in their chain; chains masked at every depth are left
    out of the mean. Equals 1 - E[accepted drafts] / g of chain rejection sampling when the
    depths are independent (the teacher-forced approximation, docs/design.md#the-math).
    ``depth_weights`` [g] replaces the uniform 1/g by w_j / sum(w).
    """
    _check(draft_logits, target_probs, mask)
    m = _full_mask(draft_logits, mask)
    alpha = torch.where(m, acceptance_rates(draft_logits, target_probs), 0.0)
    w = torch.ones(alpha.shape[1]) if depth_weights is None else depth_weights.to(alpha)
    per_chain = 1 - (torch.cumprod(alpha, dim=1) * w).sum(dim=1) / w.sum()
    return _masked_mean(per_chain[:, None], m.any(dim=1)[:, None])


def tv_loss(
    draft_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    depth_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-depth total variation, mean over unmasked (chain, depth) of 1 - alpha (no product)."""
    _check(draft_logits, target_probs, mask)
    m = _full_mask(draft_logits, mask)
    return _masked_mean(1 - acceptance_rates(draft_logits, target_probs), m, depth_weights)


def _chunked_rows(fn, logits: torch.Tensor, other: torch.Tensor, chunk: int) -> torch.Tensor:  # noqa: ANN001
    """fn over row chunks under checkpointing: its [chunk, V] temporaries are not kept."""
    parts = [
        checkpoint(fn, logits[rows], other[rows], use_reentrant=False) for rows in _row_chunks(logits.shape[0], chunk)
    ]
    return torch.cat(parts)


def kl_per_position(draft_logits: torch.Tensor, target_probs: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Forward KL(p || q) [N, g] in nats."""
    _check(draft_logits, target_probs)
    return _BlockwiseRowFunction.apply(draft_logits, target_probs.detach(), chunk, _kl_value, _kl_grad)


def kl_loss(
    draft_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    depth_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL(p || q), mean over unmasked (chain, depth). With p restricted to a draft
    vocabulary (mass m < 1 inside it) this is sum_D p log(p / q), minimised by q = p / m: the
    target renormalised on the vocabulary, as EAGLE-3 / FR-Spec train."""
    _check(draft_logits, target_probs, mask)
    return _masked_mean(kl_per_position(draft_logits, target_probs), _full_mask(draft_logits, mask), depth_weights)


def _ce_rows(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), target_ids, reduction="none")


def ce_loss(
    draft_logits: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    depth_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy against the sampled tokens ``target_ids`` [N, g] (DeepSeek-V3 MTP), mean over
    unmasked (chain, depth). Masked positions may hold any id (e.g. -1)."""
    if draft_logits.dim() != 3 or tuple(target_ids.shape) != tuple(draft_logits.shape[:2]):
        raise ValueError(
            f"ce_loss wants draft_logits [N, g, V] and target_ids [N, g]; got {tuple(draft_logits.shape)} "
            f"and {tuple(target_ids.shape)}"
        )
    m = _full_mask(draft_logits, mask)
    ids = torch.where(m, target_ids, 0).long()
    cols = [_chunked_rows(_ce_rows, draft_logits[:, j], ids[:, j], CHUNK_ROWS) for j in range(draft_logits.shape[1])]
    return _masked_mean(torch.stack(cols, dim=1), m, depth_weights)


def hybrid_loss(
    draft_logits: torch.Tensor,
    target_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    depth_weights: torch.Tensor | None = None,
    eta: float = HYBRID_ETA,
) -> torch.Tensor:
    """lambda * KL + (1 - lambda) * TV per (chain, depth), lambda = exp(-eta * sg[alpha]): KL's
    strong gradient at a cold start (alpha ~ 0), TV once acceptance is high."""
    _check(draft_logits, target_probs, mask)
    m = _full_mask(draft_logits, mask)
    alpha = acceptance_rates(draft_logits, target_probs)
    lam = torch.exp(-eta * alpha.detach())
    per = lam * kl_per_position(draft_logits, target_probs) + (1 - lam) * (1 - alpha)
    return _masked_mean(per, m, depth_weights)


def feature_loss(
    draft_features: torch.Tensor,
    target_features: torch.Tensor,
    mask: torch.Tensor | None = None,
    depth_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """EAGLE-style feature regression: SmoothL1(norm(r_j), h_{t+j}) averaged over the hidden
    dimension, then the masked (depth-weighted) mean over (chain, depth). ``draft_features`` and
    ``target_features`` [N, g, H]; the target side is stop-gradient. Both sit in the space the
    lm_head reads, so a head that matches h_{t+j} also matches the target's distribution, and a
    head that feeds norm(r_j) to the next depth (``feedback = "normed"``) hands it a target-like
    input."""
    if draft_features.dim() != 3 or draft_features.shape != target_features.shape:
        raise ValueError(f"feature_loss wants two [N, g, H] tensors; got {tuple(draft_features.shape)} "
                         f"and {tuple(target_features.shape)}")
    per = torch.nn.functional.smooth_l1_loss(
        draft_features.float(), target_features.detach().float(), reduction="none").mean(-1)
    return _masked_mean(per, _full_mask(draft_features, mask), depth_weights)


LOSSES = ("ce", "kl", "tv", "e2e-tv", "hybrid")
