"""Training MTP heads: self-distillation data, losses, the trainer and held-out evaluation.

Light imports only here (no vLLM); ``bebop_vllm.train.generate`` imports vLLM when it runs.
"""

from bebop_vllm.train.dataset import SequenceSet, default_data_dir, load_split
from bebop_vllm.train.losses import (
    acceptance_rates,
    ce_loss,
    e2e_tv_loss,
    hybrid_loss,
    kl_loss,
    tv_loss,
)
from bebop_vllm.train.trainer import TrainConfig, train

__all__ = [
    "SequenceSet",
    "TrainConfig",
    "acceptance_rates",
    "ce_loss",
    "default_data_dir",
    "e2e_tv_loss",
    "hybrid_loss",
    "kl_loss",
    "load_split",
    "train",
    "tv_loss",
]
