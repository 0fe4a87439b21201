"""Triton kernels for chain speculative sampling (the CUDA path).

Two kernels, both fed the random numbers drawn in torch (``random_numbers.py``) so that they
consume exactly what the torch path consumes:

``row_stats_kernel``  grid (N,): one streaming pass over a logits row computing, for the
    tempered row s = logits / T, its log-sum-exp, first-index argmax and (optionally) the
    entropy in nats, with an online (running max) softmax: no ``[N, V]`` buffer is written.
``accept_and_sample_kernel``  grid (B,): per request, walk its draft positions (loop inside
    the kernel, stopping at the first rejection), then draw the one emitted token from the
    residual / bonus row by the blockwise inverse CDF of ``inverse_cdf.py`` (same blocks,
    same float32/float64 split). Target probabilities come either from a probability tensor
    or, fused, from logits + temperature + the row's log-sum-exp.

No host synchronisation: every size used for launching is a host int, every data-dependent
decision happens on the device. Importing this module needs Triton; run it on CPU only with
``TRITON_INTERPRET=1`` (set before Triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from bebop_vllm.kernels.inverse_cdf import BLOCK_V
from bebop_vllm.kernels.layout import RaggedLayout
from bebop_vllm.kernels.random_numbers import RejectionUniforms
from bebop_vllm.kernels.rejection_torch import PLACEHOLDER_TOKEN_ID

STATS_BLOCK = 2048


@triton.jit
def row_stats_kernel(
    logits_ptr,  # [N, V] float32 / bfloat16 / float16, row stride `row_stride`
    row_temperature_ptr,  # [N] float32, greedy rows already replaced by 1
    lse_ptr,  # [N] float32 out: log-sum-exp of logits / T
    argmax_ptr,  # [N] int32 out: first index of the row maximum
    entropy_ptr,  # [N] float32 out (COMPUTE_ENTROPY): entropy of softmax(logits / T), nats
    vocab_size,
    row_stride,
    COMPUTE_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(row_temperature_ptr + row)
    base = logits_ptr + row * row_stride
    neg_inf = float("-inf")
    running_max = tl.full([], neg_inf, tl.float32)
    # z = sum exp(s - running_max); w = sum exp(s - running_max) * (s - running_max).
    z = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    best = tl.full([], neg_inf, tl.float32)
    best_index = tl.zeros([], tl.int32)
    for start in range(0, vocab_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        in_vocab = offsets < vocab_size
        s = tl.load(base + offsets, mask=in_vocab, other=neg_inf).to(tl.float32) / temperature
        block_max, block_index = tl.max(s, axis=0, return_indices=True)
        if block_max > best:  # strict: an earlier block keeps a tie (first-index argmax)
            best = block_max
            best_index = (start + block_index).to(tl.int32)
        new_max = tl.maximum(running_max, block_max)
        # Until a finite logit is seen, shift by 0 so that exp(-inf - shift) is a clean 0.
        shift = tl.where(new_max == neg_inf, 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        e = tl.exp(s - shift)
        if COMPUTE_ENTROPY:
            centred = tl.where(s > neg_inf, s - shift, 0.0)
            # (running_max - shift) is -inf while z == 0; zero it first so no 0 * inf NaN.
            carried = w + tl.where(z > 0, running_max - shift, 0.0) * z
            w = rescale * carried + tl.sum(e * centred, axis=0)
        z = z * rescale + tl.sum(e, axis=0)
        running_max = new_max
    log_z = tl.log(z)
    tl.store(lse_ptr + row, running_max + log_z)
    tl.store(argmax_ptr + row, best_index)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, log_z - w / z)


@triton.jit
def _emitted_weights(
    target_ptr,
    row_base,
    temperature,
    lse,
    draft_probs_ptr,
    draft_base,
    rejected_token,
    residual,
    offsets,
    in_vocab,
    FROM_LOGITS: tl.constexpr,
    HAS_DRAFT_PROBS: tl.constexpr,
):
    """One block of the emitted token's weights: max(p - q, 0) if `residual`, else p."""
    if FROM_LOGITS:
        logit = tl.load(target_ptr + row_base + offsets, mask=in_vocab, other=float("-inf"))
        p = tl.exp(logit.to(tl.float32) / temperature - lse)
    else:
        p = tl.load(target_ptr + row_base + offsets, mask=in_vocab, other=0.0).to(tl.float32)
    if HAS_DRAFT_PROBS:
        q = tl.load(draft_probs_ptr + draft_base + offsets, mask=in_vocab & residual, other=0.0)
        q = q.to(tl.float32)
    else:
        q = tl.where((offsets == rejected_token) & residual, 1.0, 0.0)
    return tl.where(in_vocab, tl.maximum(p - q, 0.0), 0.0)


@triton.jit
def _emitted_total(
    target_ptr,
    row_base,
    temperature,
    lse,
    draft_probs_ptr,
    draft_base,
    rejected_token,
    residual,
    vocab_size,
    FROM_LOGITS: tl.constexpr,
    HAS_DRAFT_PROBS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``(total, last_positive)``: the emitted weights' sum (float32 blocks, float64 total) and
    the last token with positive weight (the inverse CDF's fallback)."""
    total = tl.zeros([], tl.float64)
    last_positive = tl.zeros([], tl.int64)
    for start in range(0, vocab_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        w = _emitted_weights(
            target_ptr, row_base, temperature, lse, draft_probs_ptr, draft_base,
            rejected_token, residual, offsets, offsets < vocab_size,
            FROM_LOGITS, HAS_DRAFT_PROBS,
        )
        total += tl.sum(w, axis=0).to(tl.float64)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(w > 0, offsets, 0), axis=0))
    return total, last_positive


@triton.jit
def accept_and_sample_kernel(
    output_ptr,  # [B, output_stride] int32, pre-filled with -1
    num_accepted_ptr,  # [B] int32 out
    target_ptr,  # [N, V] probabilities, or logits if FROM_LOGITS
    target_row_stride,
    row_temperature_ptr,  # [N] float32 (FROM_LOGITS)
    lse_ptr,  # [N] float32 (FROM_LOGITS)
    row_argmax_ptr,  # [N] int32 (HAS_GREEDY)
    bonus_argmax_ptr,  # [B] int64 (HAS_GREEDY)
    greedy_ptr,  # [B] bool (HAS_GREEDY)
    bonus_token_ids_ptr,  # [B] int (HAS_BONUS_IDS): emitted when every draft is accepted
    draft_token_ids_ptr,  # [Nd]; ids outside [0, V) (vLLM's -1 padding) are rejected
    draft_probs_ptr,  # [Nd, V] (HAS_DRAFT_PROBS)
    draft_row_stride,
    num_draft_tokens_ptr,  # [B] int64
    draft_start_ptr,  # [B] int64
    accept_u_ptr,  # [Nd] float64
    final_u_ptr,  # [B] float64
    vocab_size,
    output_stride,
    FROM_LOGITS: tl.constexpr,
    HAS_DRAFT_PROBS: tl.constexpr,
    HAS_GREEDY: tl.constexpr,
    HAS_BONUS_IDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    request = tl.program_id(0).to(tl.int64)
    num_drafts = tl.load(num_draft_tokens_ptr + request)
    draft_start = tl.load(draft_start_ptr + request)
    if HAS_BONUS_IDS:
        row_start = draft_start  # target rows are the draft rows only
    else:
        row_start = draft_start + request  # k_i draft rows, then the bonus row
    out_base = output_ptr + request * output_stride
    greedy = tl.zeros([], tl.int1)
    if HAS_GREEDY:
        greedy = tl.load(greedy_ptr + request) != 0

    num_accepted = tl.zeros([], tl.int64)
    rejected = tl.zeros([], tl.int1)
    for pos in range(0, num_drafts):
        if not rejected:
            token = tl.load(draft_token_ids_ptr + draft_start + pos).to(tl.int64)
            # An invalid id is never read through (masked loads) and is rejected below.
            valid = (token >= 0) & (token < vocab_size)
            row = row_start + pos
            if FROM_LOGITS:
                logit = tl.load(target_ptr + row * target_row_stride + token, mask=valid, other=float("-inf"))
                temperature = tl.load(row_temperature_ptr + row)
                p = tl.exp(logit.to(tl.float32) / temperature - tl.load(lse_ptr + row))
            else:
                p = tl.load(target_ptr + row * target_row_stride + token, mask=valid, other=0.0).to(tl.float32)
            u = tl.load(accept_u_ptr + draft_start + pos)
            if HAS_DRAFT_PROBS:
                q = tl.load(draft_probs_ptr + (draft_start + pos) * draft_row_stride + token, mask=valid, other=0.0)
                q = q.to(tl.float32)
                accept = (q > 0) & (u < (p / q).to(tl.float64))
            else:
                accept = u < p.to(tl.float64)
            if HAS_GREEDY:
                if greedy:
                    accept = token == tl.load(row_argmax_ptr + row).to(tl.int64)
            accept = accept & valid
            if accept:
                tl.store(out_base + pos, token.to(tl.int32))
                num_accepted += 1
            else:
                rejected = True
    tl.store(num_accepted_ptr + request, num_accepted.to(tl.int32))

    final_row = row_start + num_accepted
    final_token = tl.zeros([], tl.int64)
    take_bonus_id = tl.zeros([], tl.int1)
    if HAS_BONUS_IDS:
        take_bonus_id = not rejected
    if take_bonus_id:
        # No bonus row to read (and final_row may be past the last row): the given token.
        final_token = tl.load(bonus_token_ids_ptr + request).to(tl.int64)
    elif greedy:
        if rejected:
            final_token = tl.load(row_argmax_ptr + final_row).to(tl.int64)
        else:
            final_token = tl.load(bonus_argmax_ptr + request).to(tl.int64)
    else:
        row_base = final_row * target_row_stride
        temperature = 1.0
        lse = 0.0
        if FROM_LOGITS:
            temperature = tl.load(row_temperature_ptr + final_row)
            lse = tl.load(lse_ptr + final_row)
        rejected_index = draft_start + tl.minimum(num_accepted, tl.maximum(num_drafts - 1, 0))
        # -1 (one-hot on no token) unless a valid draft token was rejected: an invalid
        # draft removes no mass from p, as in vLLM's recovered-token kernel.
        rejected_token = tl.zeros([], tl.int64) - 1
        if rejected:
            rejected_token = tl.load(draft_token_ids_ptr + rejected_index).to(tl.int64)
            if (rejected_token < 0) | (rejected_token >= vocab_size):
                rejected_token = tl.zeros([], tl.int64) - 1
        draft_base = rejected_index * draft_row_stride
        # Pass 1: total mass of the emitted distribution (float32 blocks, float64 total).
        residual = rejected
        total, last_positive = _emitted_total(
            target_ptr, row_base, temperature, lse, draft_probs_ptr, draft_base,
            rejected_token, residual, vocab_size, FROM_LOGITS, HAS_DRAFT_PROBS, BLOCK,
        )
        if residual and total == 0:
            # p == q: the rejection had probability 0 (float rounding); sample p instead,
            # as prob_math.residual_distribution does.
            residual = tl.zeros([], tl.int1)
            total, last_positive = _emitted_total(
                target_ptr, row_base, temperature, lse, draft_probs_ptr, draft_base,
                rejected_token, residual, vocab_size, FROM_LOGITS, HAS_DRAFT_PROBS, BLOCK,
            )
        # Pass 2: find the block, then the token, where the CDF first exceeds u * total.
        threshold = tl.load(final_u_ptr + request) * total
        final_token = last_positive
        mass_before = tl.zeros([], tl.float64)
        found = tl.zeros([], tl.int1)
        start = 0
        while (start < vocab_size) & (not found):
            offsets = start + tl.arange(0, BLOCK)
            w = _emitted_weights(
                target_ptr, row_base, temperature, lse, draft_probs_ptr, draft_base,
                rejected_token, residual, offsets, offsets < vocab_size,
                FROM_LOGITS, HAS_DRAFT_PROBS,
            )
            block_mass = tl.sum(w, axis=0).to(tl.float64)
            if mass_before + block_mass > threshold:
                local_cdf = tl.cumsum(w, axis=0)
                local = tl.arange(0, BLOCK)
                local_threshold = (threshold - mass_before).to(tl.float32)
                hit = tl.min(tl.where(local_cdf > local_threshold, local, BLOCK), axis=0)
                if hit == BLOCK:
                    hit = tl.max(tl.where(w > 0, local, 0), axis=0)
                final_token = (start + hit).to(tl.int64)
                found = True
            mass_before += block_mass
            start += BLOCK
    tl.store(out_base + num_accepted, final_token.to(tl.int32))


def row_stats(
    logits: torch.Tensor, row_temperature: torch.Tensor, compute_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row ``(lse f32 [N], argmax int32 [N], entropy f32 [N] | None)`` of ``logits [N, V] / T``."""
    rows, vocab = logits.shape
    device = logits.device
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    argmax = torch.empty(rows, dtype=torch.int32, device=device)
    entropy = torch.empty(rows, dtype=torch.float32, device=device) if compute_entropy else lse
    if rows:
        row_stats_kernel[(rows,)](
            logits, row_temperature, lse, argmax, entropy, vocab, logits.stride(0),
            COMPUTE_ENTROPY=compute_entropy, BLOCK=STATS_BLOCK,
        )
    return lse, argmax, (entropy if compute_entropy else None)


def accept_and_sample(
    target: torch.Tensor,
    draft_token_ids: torch.Tensor,
    layout: RaggedLayout,
    draft_probs: torch.Tensor | None,
    uniforms: RejectionUniforms,
    *,
    row_temperature: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    greedy_request: torch.Tensor | None = None,
    row_argmax: torch.Tensor | None = None,
    bonus_argmax: torch.Tensor | None = None,
    bonus_token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``accept_and_sample_kernel``; ``target`` is probabilities unless ``lse`` is given.

    Shapes as in ``rejection_torch.rejection_sample_torch``; with logits, ``row_temperature
    [N]`` and ``lse [N]`` (from ``row_stats``) define p = exp(logits / T - lse). Without
    bonus rows (``layout.has_bonus_rows`` False) ``bonus_token_ids [B]`` is required.
    Returns ``(output_token_ids int32 [B, max_k + 1], num_accepted int32 [B])``.
    """
    batch = layout.batch_size
    device = target.device
    width = layout.max_num_draft_tokens + 1
    output = torch.full((batch, width), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
    num_accepted = torch.empty(batch, dtype=torch.int32, device=device)
    if batch == 0:
        return output, num_accepted
    from_logits = lse is not None
    has_greedy = greedy_request is not None
    has_bonus_ids = not layout.has_bonus_rows
    if has_bonus_ids and bonus_token_ids is None:
        raise ValueError("target rows without bonus rows need bonus_token_ids")
    dummy = uniforms.final  # any tensor: pointers of disabled features are never read
    accept_and_sample_kernel[(batch,)](
        output, num_accepted, target, target.stride(0),
        row_temperature if from_logits else dummy,
        lse if from_logits else dummy,
        row_argmax if has_greedy else dummy,
        bonus_argmax if has_greedy and bonus_argmax is not None else dummy,
        greedy_request if has_greedy else dummy,
        bonus_token_ids.reshape(-1) if has_bonus_ids else dummy,
        draft_token_ids,
        draft_probs if draft_probs is not None else dummy,
        draft_probs.stride(0) if draft_probs is not None else 0,
        layout.num_draft_tokens, layout.draft_start,
        uniforms.accept, uniforms.final,
        target.shape[1], output.stride(0),
        FROM_LOGITS=from_logits,
        HAS_DRAFT_PROBS=draft_probs is not None,
        HAS_GREEDY=has_greedy,
        HAS_BONUS_IDS=has_bonus_ids,
        BLOCK=BLOCK_V,
    )
    return output, num_accepted
