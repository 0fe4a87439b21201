"""MTP draft heads: module, checkpoint format, loading and validation, reference drafting."""

from bebop_vllm.heads.checkpoint import (
    expected_tensor_shapes,
    head_config,
    init_random_heads,
    load_heads,
    new_head,
    save_heads,
)
from bebop_vllm.heads.metadata import (
    FORMAT_VERSION,
    HEAD_ARCHITECTURE,
    DataProvenance,
    HeadMetadata,
    HeldoutMetrics,
    tokenizer_fingerprint,
)
from bebop_vllm.heads.module import BebopMTPHead, HeadShape
from bebop_vllm.heads.reference import draft_chain_probs, draft_reference

__all__ = [
    "FORMAT_VERSION",
    "HEAD_ARCHITECTURE",
    "BebopMTPHead",
    "DataProvenance",
    "HeadMetadata",
    "HeadShape",
    "HeldoutMetrics",
    "draft_chain_probs",
    "draft_reference",
    "expected_tensor_shapes",
    "head_config",
    "init_random_heads",
    "load_heads",
    "new_head",
    "save_heads",
    "tokenizer_fingerprint",
]
