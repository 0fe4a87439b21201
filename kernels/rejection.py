"""Public entry points of exact chain speculative sampling, dispatched by device.

- ``rejection_sample``: target probabilities in (already tempered / filtered).
- ``rejection_sample_from_logits``: the fused hot-path entry for vLLM's verifier: target
  logits + per-request temperature / top-k / top-p, vLLM 0.32's sampling operator applied
  (``sampling_operator.py``), greedy and random requests mixed, optional per-row entropy.
- ``greedy_verify``: temperature-0 verification.

Every entry takes target rows in one of two layouts: per request its k_i draft rows then its
bonus row (``N = sum_i (k_i + 1)``), or, when ``bonus_token_ids [B]`` is given, the draft rows
only (``N = sum_i k_i``, vLLM's ``target_logits``) with each request's bonus token already
chosen (vLLM's ``RejectionSampler`` takes it from its ``Sampler``). Draft ids outside
``[0, V)`` (vLLM pads grammar-rejected drafts with -1) are rejected at their position and never
used as an index, on every backend, as vLLM's verifier does.

Backends: Triton kernels on CUDA (``rejection_triton.py``), vectorised torch elsewhere
(``rejection_torch.py``, also the reference). ``backend="triton"`` forces the kernels, which
on CPU tensors works only under ``TRITON_INTERPRET=1`` (the tests use that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from bebop_vllm.kernels import validation
from bebop_vllm.kernels.layout import RaggedLayout, build_layout
from bebop_vllm.kernels.random_numbers import RejectionUniforms, check_uniforms, draw_uniforms
from bebop_vllm.kernels.rejection_torch import (
    assemble_output,
    count_accepted,
    rejection_sample_torch,
)
from bebop_vllm.kernels.sampling_operator import (
    apply_temperature,
    apply_top_k_top_p,
    effective_temperature,
    is_greedy_temperature,
)

Backend = Literal["auto", "torch", "triton"]


class RejectionOutput(NamedTuple):
    """output_token_ids int32 [B, max_k + 1] (-1 padded); num_accepted int32 [B];
    entropy float32 [N] (nats, per target row) or None."""

    output_token_ids: torch.Tensor
    num_accepted: torch.Tensor
    entropy: torch.Tensor | None


def _use_triton(device: torch.device, backend: Backend) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _layout_for(
    num_draft_tokens: Sequence[int] | torch.Tensor,
    draft_token_ids: torch.Tensor,
    device: torch.device,
    max_num_draft_tokens: int | None,
    bonus_token_ids: torch.Tensor | None = None,
) -> RaggedLayout:
    return build_layout(
        num_draft_tokens, draft_token_ids.shape[0], device, max_num_draft_tokens,
        bonus_rows=bonus_token_ids is None,
    )


def _validate_common(
    target: torch.Tensor,
    name: str,
    num_draft_tokens: Sequence[int] | torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    bonus_token_ids: torch.Tensor | None,
) -> list[int]:
    """Checks shared by the entries; returns k_i as host ints."""
    device = target.device
    counts = validation.check_num_draft_tokens(num_draft_tokens)
    validation.check_target_rows(target, counts, name, bonus_rows=bonus_token_ids is None)
    vocab = target.shape[1]
    validation.check_draft_tokens(draft_token_ids, counts, vocab, device)
    if draft_probs is not None:
        validation.check_draft_probs(draft_probs, draft_token_ids, vocab, device)
    if bonus_token_ids is not None:
        validation.check_bonus_token_ids(bonus_token_ids, len(counts), vocab, device)
    return counts


def _uniforms_for(
    layout: RaggedLayout,
    device: torch.device,
    generator: torch.Generator | None,
    uniforms: RejectionUniforms | None,
) -> RejectionUniforms:
    if uniforms is None:
        return draw_uniforms(layout.total_draft_tokens, layout.batch_size, device, generator)
    check_uniforms(uniforms, layout.total_draft_tokens, layout.batch_size)
    return uniforms


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: Sequence[int] | torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    validate: bool = True,
    uniforms: RejectionUniforms | None = None,
    backend: Backend = "auto",
    bonus_token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact chain rejection sampling from target probabilities.

    Args:
        target_probs: float32 ``[sum_i (k_i + 1), V]``: per request, its k_i draft-position
            rows then its bonus row; with ``bonus_token_ids``, ``[sum_i k_i, V]`` (draft rows
            only). Each row is the distribution the target samples from.
        draft_token_ids: int ``[sum_i k_i]``; ids < 0 are rejected at their position.
        num_draft_tokens: ``[B]`` list or int tensor, k_i >= 0 (a device tensor costs one
            sync to size the output; pass a list on hot paths).
        draft_probs: float32 ``[sum_i k_i, V]``, or None for one-hot (greedy) drafts.
        generator: ``torch.Generator`` on the tensors' device (same state -> same output).
        validate: check the inputs (device syncs); False on hot paths.
        uniforms: pre-drawn random numbers (``draw_uniforms``) instead of ``generator``.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
        bonus_token_ids: int ``[B]`` (or ``[B, 1]``): the token emitted when all k_i drafts
            are accepted; then ``target_probs`` holds no bonus rows.

    Returns:
        ``output_token_ids`` int32 ``[B, max_i k_i + 1]`` (accepted drafts, then the
        recovered or bonus token, then -1) and ``num_accepted`` int32 ``[B]``.

    Rule: accept x_j with probability min(1, p_j(x_j) / q_j(x_j)) (one-hot: iff u < p_j(x_j));
    at the first rejection emit a token from normalize(max(p_j - q_j, 0)) and stop; if all
    k_i are accepted emit a token from the bonus row.
    """
    device = target_probs.device
    max_k = None
    if validate:
        counts = _validate_common(
            target_probs, "target_probs", num_draft_tokens, draft_token_ids, draft_probs, bonus_token_ids
        )
        validation.check_distribution(target_probs, "target_probs")
        max_k = max(counts, default=0)
    layout = _layout_for(num_draft_tokens, draft_token_ids, device, max_k, bonus_token_ids)
    uniforms = _uniforms_for(layout, device, generator, uniforms)
    if _use_triton(device, backend):
        from bebop_vllm.kernels.rejection_triton import accept_and_sample

        return accept_and_sample(
            target_probs.contiguous(), draft_token_ids.contiguous(), layout,
            draft_probs.contiguous() if draft_probs is not None else None, uniforms,
            bonus_token_ids=bonus_token_ids,
        )
    return rejection_sample_torch(
        target_probs, draft_token_ids, layout, draft_probs, uniforms, bonus_token_ids=bonus_token_ids
    )


def greedy_verify(
    target_logits_or_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: Sequence[int] | torch.Tensor,
    *,
    validate: bool = True,
    bonus_token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-0 verification: accept while draft == target argmax, then emit the argmax.

    Shapes: ``[sum_i (k_i + 1), V]`` logits or probabilities (argmax is the same), or
    ``[sum_i k_i, V]`` with ``bonus_token_ids [B]`` (emitted when all drafts match); draft
    ids ``[sum_i k_i]`` (ids < 0 never match), ``num_draft_tokens [B]``. Returns
    ``(output_token_ids int32 [B, max_k + 1] -1 padded, num_accepted int32 [B])``. Ties go
    to the first index, as ``torch.argmax`` and vLLM's greedy sampler break them.
    """
    device = target_logits_or_probs.device
    max_k = None
    if validate:
        counts = _validate_common(
            target_logits_or_probs, "target_logits_or_probs", num_draft_tokens, draft_token_ids,
            None, bonus_token_ids,
        )
        if not target_logits_or_probs.dtype.is_floating_point:
            raise ValueError(
                f"target_logits_or_probs must be floating point, got {target_logits_or_probs.dtype}"
            )
        if bool(torch.isnan(target_logits_or_probs).any()):
            raise ValueError("target_logits_or_probs contains NaN")
        max_k = max(counts, default=0)
    layout = _layout_for(num_draft_tokens, draft_token_ids, device, max_k, bonus_token_ids)
    row_argmax = target_logits_or_probs.argmax(dim=-1)
    # A -1 draft never equals an argmax, so it is rejected without being used as an index.
    accepted = draft_token_ids.long() == row_argmax[layout.row_of_draft]
    num_accepted = count_accepted(accepted, layout)
    if bonus_token_ids is None:
        final_token = row_argmax[layout.row_start + num_accepted]
    else:
        rejected = num_accepted < layout.num_draft_tokens
        bonus = bonus_token_ids.reshape(-1).long()
        if row_argmax.shape[0]:
            final_row = (layout.row_start + num_accepted).clamp(max=row_argmax.shape[0] - 1)
            final_token = torch.where(rejected, row_argmax[final_row], bonus)
        else:
            final_token = bonus
    output = assemble_output(draft_token_ids, num_accepted, final_token, layout)
    return output, num_accepted.to(torch.int32)


def _row_entropy_from_probs(processed: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax rows, from logits ``s`` and ``p = softmax(s)``: ``[N, V]`` -> ``[N]``.

    H = lse - sum p s, with lse = s_max - log p_max (no second exp pass; p_max >= 1/V so the
    log is well conditioned). Masked (-inf) entries have p = 0 and contribute nothing.
    """
    p_max, index = probs.max(dim=-1)
    s_max = processed.gather(1, index.unsqueeze(-1)).squeeze(-1)
    if bool(torch.isneginf(processed).any()):
        weighted = torch.nansum(probs * processed, dim=-1)  # 0 * -inf = nan is dropped
    else:
        weighted = torch.linalg.vecdot(probs, processed)  # no [N, V] temporary
    return (s_max - torch.log(p_max)) - weighted


def rejection_sample_from_logits(
    logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    num_draft_tokens: Sequence[int] | torch.Tensor,
    temperature: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    *,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    max_num_draft_tokens: int | None = None,
    all_random: bool = False,
    return_entropy: bool = False,
    generator: torch.Generator | None = None,
    uniforms: RejectionUniforms | None = None,
    allow_inplace: bool = False,
    validate: bool = True,
    backend: Backend = "auto",
    bonus_token_ids: torch.Tensor | None = None,
) -> RejectionOutput:
    """Fused verifier entry for vLLM's hot path: target logits -> accepted tokens.

    Applies vLLM 0.32's sampling operator per request (temperature, greedy ``T < 1e-5`` with
    T replaced by 1, then top-k and top-p jointly, exactly as ``apply_sampling_constraints``
    and ``Sampler`` do), then chain rejection sampling. Greedy requests (temperature 0)
    accept while draft == argmax of the processed row and take the argmax of the raw bonus
    row, like vLLM's greedy kernel and greedy bonus sampler; random requests are sampled
    exactly from the processed distribution.

    Args:
        logits: ``[N, V]`` float32/bf16/f16, ``N = sum_i (k_i + 1)``, vLLM's layout (per
            request its k_i draft-position rows, then its bonus row); with
            ``bonus_token_ids``, ``N = sum_i k_i`` (draft rows only). Not modified unless
            ``allow_inplace`` and top-k/top-p are used (then a float32 ``logits`` is divided
            and masked in place, as vLLM does on its own copy).
        draft_token_ids: int ``[Nd = sum_i k_i]``; ids < 0 are rejected at their position.
        num_draft_tokens: ``[B]`` list of ints (vLLM's ``metadata.num_draft_tokens``) or
            int tensor.
        temperature: float ``[B]`` per request (0 = greedy); vLLM's
            ``sampling_metadata.temperature``.
        draft_probs: float32 ``[Nd, V]`` or None (one-hot drafts).
        top_k: int ``[B]`` (V = off) or None; ``top_p``: float ``[B]`` (1 = off) or None.
        max_num_draft_tokens: ``max_i k_i`` (vLLM's ``metadata.max_spec_len``); needed
            only when ``num_draft_tokens`` is a device tensor (else derived with a sync).
        all_random: promise that no request is greedy (vLLM's ``sampling_metadata.all_random``):
            skips the argmax work. All-greedy batches should call ``greedy_verify``.
        return_entropy: also return float32 ``[N]`` entropy (nats) of every target row's
            processed distribution (for greedy rows: of softmax(logits), i.e. T = 1).
        generator / uniforms: random source (see ``rejection_sample``).
        validate: check inputs (device syncs).
        backend: "auto" | "torch" | "triton".
        bonus_token_ids: int ``[B]`` (or ``[B, 1]``): each request's bonus token, already
            sampled (vLLM's ``RejectionSampler`` gets it from its ``Sampler``); emitted, for
            greedy and random requests alike, when every draft is accepted.

    Returns:
        ``RejectionOutput(output_token_ids int32 [B, max_k + 1] -1 padded,
        num_accepted int32 [B], entropy float32 [N] or None)``.

    On CUDA the softmax runs inside the kernels (online, one streaming pass per row for the
    log-sum-exp / argmax / entropy, then only the emitted row per request is re-read): no
    ``[N, V]`` probability buffer is written. Top-k / top-p need vLLM's masking op, which
    works on a float32 copy of the logits (or in place with ``allow_inplace``).
    """
    device = logits.device
    if validate:
        counts = _validate_common(logits, "logits", num_draft_tokens, draft_token_ids, draft_probs, bonus_token_ids)
        validation.check_logits(logits)
        validation.check_sampling_params(temperature, top_k, top_p, len(counts), logits.shape[1])
        max_num_draft_tokens = max(counts, default=0)
    layout = _layout_for(num_draft_tokens, draft_token_ids, device, max_num_draft_tokens, bonus_token_ids)
    uniforms = _uniforms_for(layout, device, generator, uniforms)

    greedy_request = None if all_random else is_greedy_temperature(temperature.to(device))
    row_temperature = effective_temperature(temperature.to(device))[layout.request_of_row]
    masked = top_k is not None or top_p is not None
    row_top_k = top_k.to(device)[layout.request_of_row] if top_k is not None else None
    row_top_p = top_p.to(device)[layout.request_of_row] if top_p is not None else None
    bonus_argmax = None
    if greedy_request is not None and bonus_token_ids is None:
        # vLLM's greedy bonus sampler takes the argmax before temperature and top-k/top-p.
        bonus_argmax = logits[layout.bonus_row].argmax(dim=-1)

    if _use_triton(device, backend):
        from bebop_vllm.kernels.rejection_triton import accept_and_sample, row_stats

        source = logits if logits.stride(1) == 1 else logits.contiguous()
        kernel_temperature = row_temperature
        if masked:
            inplace = allow_inplace and logits.dtype == torch.float32 and logits.is_contiguous()
            source = logits if inplace else logits.to(torch.float32, copy=True).contiguous()
            apply_temperature(source, row_temperature)
            source = apply_top_k_top_p(source, row_top_k, row_top_p)
            kernel_temperature = torch.ones_like(row_temperature)
        lse, row_argmax, entropy = row_stats(source, kernel_temperature, return_entropy)
        output, num_accepted = accept_and_sample(
            source, draft_token_ids.contiguous(), layout,
            draft_probs.contiguous() if draft_probs is not None else None, uniforms,
            row_temperature=kernel_temperature, lse=lse,
            greedy_request=greedy_request, row_argmax=row_argmax, bonus_argmax=bonus_argmax,
            bonus_token_ids=bonus_token_ids,
        )
        return RejectionOutput(output, num_accepted, entropy)

    if masked:
        inplace = allow_inplace and logits.dtype == torch.float32
        processed = logits if inplace else logits.to(torch.float32, copy=True)
        apply_temperature(processed, row_temperature)
        processed = apply_top_k_top_p(processed, row_top_k, row_top_p)
    elif bool((row_temperature == 1).all()):
        # x / 1 == x exactly: skip a full pass (and the copy, for float32 logits).
        processed = logits.float()
    else:
        # One pass writing a new tensor; bitwise the same as vLLM's copy-then-div_.
        processed = logits.float() / row_temperature.unsqueeze(-1)
    probs = processed.softmax(dim=-1)
    entropy = _row_entropy_from_probs(processed, probs) if return_entropy else None
    row_argmax = None
    if greedy_request is not None and bool(greedy_request.any()):
        row_argmax = processed.argmax(dim=-1)
    else:
        greedy_request = None
    output, num_accepted = rejection_sample_torch(
        probs, draft_token_ids, layout, draft_probs, uniforms,
        greedy_request=greedy_request, row_argmax=row_argmax, bonus_argmax=bonus_argmax,
        bonus_token_ids=bonus_token_ids,
    )
    return RejectionOutput(output, num_accepted, entropy)
