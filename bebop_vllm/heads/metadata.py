"""The head checkpoint's ``bebop.json``: a pydantic schema, plus the target fingerprints it records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bebop_vllm.errors import BebopError

FORMAT_VERSION = 1
HEAD_ARCHITECTURE = "BebopMTPModel"
LossName = Literal["ce", "kl", "tv", "e2e-tv", "hybrid", "random-init"]


class DataProvenance(BaseModel):
    """Where the training tokens came from (``bebop generate-data``)."""

    model_config = ConfigDict(extra="allow")
    source: str = Field(description="dataset folder or 'none' for random heads")
    domains: list[str] = Field(default_factory=list)
    num_sequences: int = 0
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    temperatures: list[float] = Field(default_factory=list, description="sampling temperature(s) of the data")


class HeldoutMetrics(BaseModel):
    """Teacher-forced held-out acceptance at the training temperature."""

    alphas: list[float] = Field(description="alpha_1..alpha_g (mean one-step acceptance per depth)")
    expected_accepted_length: float = Field(description="1 + sum_j prod_{i<=j} alpha_i (tokens per verify step)")
    num_chains: int
    num_sequences: int
    temperature: float


class EngineMeasured(BaseModel):
    """The heads served by vLLM at batch 1 (``benchmarks/bench_throughput.py``, recorded into the
    heads folder by ``benchmarks/record_engine_metrics.py``): what a user gets, next to the
    teacher-forced ``heldout`` numbers."""

    model_config = ConfigDict(extra="forbid")
    command: str = Field(description="the benchmark command that measured these numbers")
    machine: str = Field(description="CPU/GPU model and flags the numbers were measured on")
    k: int = Field(ge=1, description="num_speculative_tokens of the fixed-k engine")
    tokens_per_verify_step: dict[str, dict[str, float]] = Field(
        description="temperature -> domain -> mean tokens per verify step (accepted drafts + 1), fixed k")
    speedup_vs_plain: dict[str, dict[str, float]] = Field(
        description="temperature -> engine -> tokens/s vs plain decoding, geometric mean over domains")


class HeadMetadata(BaseModel):
    """Contents of ``bebop.json`` in a head checkpoint folder."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    target_architecture: str
    target_model: str = Field(description="name or path of the target model the head was made for")
    hidden_size: int
    vocab_size: int
    tokenizer_fingerprint: str = Field(description="sha256 of the target's sorted vocabulary")
    num_depths: int = Field(ge=1)
    loss: LossName
    train_temperature: float = 1.0
    data: DataProvenance
    train_steps: int = 0
    train_tokens: int = 0
    heldout: HeldoutMetrics | None = None
    seed: int = 0
    notes: str = ""
    engine: EngineMeasured | None = None


def tokenizer_fingerprint(target_model_dir: str | Path) -> str:
    """sha256 of the target tokenizer's vocabulary as sorted (token, id) pairs."""
    path = Path(target_model_dir) / "tokenizer.json"
    if not path.is_file():
        raise BebopError(f"{path} not found: the target model folder needs a tokenizer.json")
    vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
    items = sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict) else vocab
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def write_metadata(head_dir: Path, metadata: HeadMetadata) -> Path:
    """Write ``head_dir/bebop.json`` (the one format :func:`read_metadata` reads)."""
    path = Path(head_dir) / "bebop.json"
    path.write_text(metadata.model_dump_json(indent=2) + "\n")
    return path


def read_metadata(head_dir: Path) -> HeadMetadata:
    path = head_dir / "bebop.json"
    if not path.is_file():
        raise BebopError(
            f"{path} not found: not a bebop head folder (expected model.safetensors, config.json, bebop.json)"
        )
    try:
        return HeadMetadata.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as e:
        first = str(e).splitlines()
        raise BebopError(f"{path} is not valid head metadata: {' '.join(first[:3])}") from None
