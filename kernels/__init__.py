"""Bebop rejection-sampling kernels (Triton on GPU, torch on CPU), imported as ``bebop_vllm.kernels``."""

from bebop_vllm.kernels.prob_math import (
    acceptance_rate,
    entropy,
    expected_accepted_length,
    residual_distribution,
)
from bebop_vllm.kernels.random_numbers import (
    RejectionUniforms,
    draw_uniforms,
    draw_uniforms_for_requests,
)
from bebop_vllm.kernels.rejection import (
    RejectionOutput,
    greedy_verify,
    rejection_sample,
    rejection_sample_from_logits,
)

__all__ = [
    "RejectionOutput",
    "RejectionUniforms",
    "acceptance_rate",
    "draw_uniforms",
    "draw_uniforms_for_requests",
    "entropy",
    "expected_accepted_length",
    "greedy_verify",
    "rejection_sample",
    "rejection_sample_from_logits",
    "residual_distribution",
]
