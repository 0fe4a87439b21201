"""The random numbers chain speculative sampling consumes, drawn in torch for every backend.

Both the Triton kernels and the torch path take these tensors as inputs instead of drawing
their own, so the same generator state gives the same output on either path (and the
Triton-interpreter-vs-torch tests compare like with like).

- ``accept``  float64 ``[Nd]``: one uniform per draft position; accept iff ``u < p(x)/q(x)``.
- ``final``   float64 ``[B]``: one uniform per request for the one token emitted from a
  distribution (the residual at the first rejection, or the bonus row), by inverse CDF.
  One per request suffices: exactly one such token is emitted per request, and the event
  that selects its row depends only on ``accept``, which is independent of ``final``.

float64 because float32 uniforms come on a 2^-24 grid: an inverse CDF over 151,936 tokens
would then misplace up to ~V * 2^-25 of probability mass (≈ 0.5% TV), and ``u`` could be
exactly 0 (pytorch#16706), which would accept a draft token the target gives probability 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RejectionUniforms(NamedTuple):
    """accept: float64 [Nd] uniforms in [0, 1); final: float64 [B] uniforms in [0, 1)."""

    accept: torch.Tensor
    final: torch.Tensor


def draw_uniforms(
    total_draft_tokens: int,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> RejectionUniforms:
    """One ``torch.rand`` call for all ``Nd + B`` uniforms (same generator state -> same draws)."""
    u = torch.rand(
        total_draft_tokens + batch_size, dtype=torch.float64, device=device, generator=generator
    )
    return RejectionUniforms(accept=u[:total_draft_tokens], final=u[total_draft_tokens:])


def check_uniforms(uniforms: RejectionUniforms, total_draft_tokens: int, batch_size: int) -> None:
    """ValueError unless ``uniforms`` are float64 with shapes ``[Nd]`` and ``[B]``."""
    for name, tensor, size in (
        ("accept", uniforms.accept, total_draft_tokens),
        ("final", uniforms.final, batch_size),
    ):
        if tensor.dtype != torch.float64 or tuple(tensor.shape) != (size,):
            raise ValueError(
                f"uniforms.{name} must be float64 of shape ({size},), "
                f"got {tensor.dtype} of shape {tuple(tensor.shape)}"
            )


def draw_uniforms_for_requests(
    num_draft_tokens: list[int],
    device: torch.device,
    generators: dict[int, torch.Generator] | None = None,
    *,
    skip_requests_without_drafts: bool = False,
) -> RejectionUniforms:
    """Uniforms for a batch in which some requests carry their own seeded generator.

    Mirrors vLLM's ``generate_uniform_probs``: one unseeded draw for everyone, then each
    seeded request (``generators[i]``, vLLM's ``sampling_metadata.generators``) redraws its
    own k_i acceptance uniforms and then its final uniform from its generator, so its output
    depends only on its seed and its own inputs. The Python loop runs over seeded requests
    only (as in vLLM). Requests with k_i = 0 draw their final uniform (it samples their bonus
    row) unless ``skip_requests_without_drafts``: when the bonus token is given
    (``bonus_token_ids``) such a request uses no uniform, and, as vLLM does, its generator
    is then left untouched.
    """
    total = sum(num_draft_tokens)
    uniforms = draw_uniforms(total, len(num_draft_tokens), device)
    if generators:
        starts = [0]
        for k in num_draft_tokens[:-1]:
            starts.append(starts[-1] + k)
        for request, generator in generators.items():
            start, k = starts[request], num_draft_tokens[request]
            if k:
                uniforms.accept[start:start + k].uniform_(generator=generator)
            elif skip_requests_without_drafts:
                continue
            uniforms.final[request : request + 1].uniform_(generator=generator)
    return uniforms
