"""vLLM 0.32's target-distribution operator: temperature, then top-k and top-p jointly.

Rejection sampling is exact only for the distribution it is given, so the verifier must
build the very distribution vLLM's own sampler would sample from (docs/design.md#the-math). This module
reproduces, op for op, what vLLM 0.32 does to target logits:

- temperature: ``vllm/v1/sample/rejection_sampler.py`` ``apply_sampling_constraints`` divides
  float32 logits by the per-token temperature, with greedy temperature 0 replaced by 1
  (``Sampler.apply_temperature`` does the same for the bonus row with ``temp < 1e-5``).
  Greedy requests always carry temperature exactly 0.0 (``gpu_input_batch.py:397``), and
  random ones ``>= 1e-5`` (``sampling_params.py``), so both rules agree on real inputs.
- top-k / top-p: ``vllm/v1/sample/ops/topk_topp_sampler.py`` ``apply_top_k_top_p_pytorch``
  (what vLLM runs whenever Triton is unavailable, i.e. on CPU; with ``allow_cpu_sync`` and
  no top-p it takes ``apply_top_k_only``, which produces the same mask). Top-k keeps every
  logit >= the k-th largest (ties kept); top-p then masks, in ascending sorted order, every
  token whose cumulative probability is <= 1 - p, always keeping the largest.

On CUDA vLLM masks with its Triton top-k/top-p kernel instead; ``apply_top_k_top_p`` below
calls that very function when vLLM is importable on a CUDA device so the operator stays the
same one vLLM applies there.
"""

from __future__ import annotations

import torch

# vllm/v1/sample/sampler.py:19 — temperatures below this are greedy.
SAMPLING_EPS = 1e-5


def is_greedy_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """Which requests are greedy: ``[B]`` float -> ``[B]`` bool (``temperature < 1e-5``)."""
    return temperature < SAMPLING_EPS


def effective_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """Temperature actually divided by: greedy (``< 1e-5``) replaced by 1. ``[B]`` -> ``[B]`` f32."""
    temperature = temperature.to(torch.float32)
    return torch.where(is_greedy_temperature(temperature), torch.ones_like(temperature), temperature)


def apply_temperature(logits: torch.Tensor, row_temperature: torch.Tensor) -> torch.Tensor:
    """float32 ``logits [N, V]`` / ``row_temperature [N]`` (already greedy-replaced), in place.

    The caller owns ``logits`` (vLLM also divides in place, on its own copy).
    """
    return logits.div_(row_temperature.unsqueeze(-1))


def apply_top_k_top_p_reference(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """Mask float32 ``logits [N, V]`` in place with per-row top-k ``[N]`` and top-p ``[N]``.

    A copy of vLLM 0.32's ``apply_top_k_top_p_pytorch`` (same ops in the same order, so the
    result is bitwise identical; ``tests/test_kernels_operator.py`` checks that against vLLM).
    ``k == V`` means no top-k, ``p == 1`` no top-p; masked entries become ``-inf``.
    """
    if k is None and p is None:
        return logits
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    if k is not None:
        kth_index = logits_sort.size(1) - k.to(torch.long)
        kth_value = logits_sort.gather(1, kth_index.unsqueeze(dim=1))
        logits_sort.masked_fill_(logits_sort < kth_value, -float("inf"))
    if p is not None:
        probs_sort = logits_sort.softmax(dim=-1)
        probs_sum = torch.cumsum(probs_sort, dim=-1, out=probs_sort)
        top_p_mask = probs_sum <= 1 - p.unsqueeze(dim=1)
        # vLLM always keeps the most probable token.
        top_p_mask[:, -1] = False
        logits_sort.masked_fill_(top_p_mask, -float("inf"))
    return logits.scatter_(dim=-1, index=logits_idx, src=logits_sort)


def apply_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k / top-p masking exactly as vLLM 0.32 does it on this device (in place).

    CUDA with vLLM importable: vLLM's own ``apply_top_k_top_p`` (its Triton kernel). Otherwise
    the bitwise copy of the PyTorch path vLLM uses on CPU.
    """
    if k is None and p is None:
        return logits
    if logits.is_cuda:
        try:
            from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p as vllm_op
        except ImportError:
            vllm_op = None
        if vllm_op is not None:
            return vllm_op(logits, k, p)
    return apply_top_k_top_p_reference(logits, k, p)
