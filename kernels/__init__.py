"""Bebop rejection-sampling kernels (Triton on GPU, torch on CPU), imported as ``bebop_vllm.kernels``."""

from bebop_vllm.kernels.prob_math import (
    acceptance_rate,
    entropy,
    expected_accepted_length,
    residual_distribution,
)

__all__ = ["acceptance_rate", "entropy", "expected_accepted_length", "residual_distribution"]
