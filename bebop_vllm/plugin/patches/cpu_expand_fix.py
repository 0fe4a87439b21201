"""Fix vLLM 0.32's CPU ``expand_batch_to_tokens``: per-token temperature/top-k/top-p were garbage.

On CPU, ``expand_batch_to_tokens`` (vllm/v1/sample/rejection_sampler.py:581, vLLM 0.32.0)
launches ``expand_kernel``, which the CPU platform routes to ``_expand_kernel_impl``
(vllm/utils/cpu_triton_utils.py:390-404). That passes an int64 *copy* of ``output`` to the C++ op
and never copies it back, so float/int32 outputs stay uninitialised: every non-greedy speculative
request samples from a wrong target distribution. We replace ``expand_batch_to_tokens`` with a
``repeat_interleave`` (exact on every device, no host sync thanks to ``output_size``).

Effect on engines that are not bebop: this is the one patch that changes vLLM's own behaviour,
for every speculative engine on a CPU host (vLLM's verifier calls the same function), and it
does so on purpose: it turns wrong outputs into right ones (docs/design.md#the-cpu-temperature-bug).
It therefore applies only where the bug exists: on CPU hosts (``applies``; on CUDA
``expand_kernel`` is a working Triton kernel and the function is left alone) and only on
releases whose ``_expand_kernel_impl`` has the recorded (buggy) source (the fingerprint check).
Engines without speculation never call it. Applied for both verifiers, so bebop-vs-vLLM
comparisons on CPU are fair.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from bebop_vllm.plugin.patches.base import Patch, on_cpu_host

UPSTREAM = (
    "vllm/v1/sample/rejection_sampler.py:581 expand_batch_to_tokens, whose CPU kernel "
    "vllm/utils/cpu_triton_utils.py:390-404 _expand_kernel_impl drops its output (vLLM 0.32.0)"
)


def expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """[batch] -> [num_tokens]: x[i] repeated (cu[i] - cu[i-1]) times, replace_from -> replace_to."""
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(x == replace_from, torch.as_tensor(replace_to, dtype=x.dtype, device=x.device), x)
    return values.repeat_interleave(counts, dim=0, output_size=num_tokens)


def _make_replacement(original: Any) -> Any:
    return functools.wraps(original)(expand_batch_to_tokens)


PATCH = Patch(
    name="cpu_expand_fix",
    upstream=UPSTREAM,
    module="vllm.v1.sample.rejection_sampler",
    attr="expand_batch_to_tokens",
    expected_params=("x", "cu_num_tokens", "num_tokens", "replace_from", "replace_to"),
    make_replacement=_make_replacement,
    applies=on_cpu_host,
)
