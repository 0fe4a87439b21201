"""A reduced draft vocabulary: the heads draft only among the target's most frequent outputs.

Why: on a small target the draft head's cost is dominated by its lm_head. For SmolLM2-135M
the 49,152 × 576 output matrix is ~21 % of the target's weights, so every draft depth costs
about a fifth of a target decode step, and a verify step with 3 drafts costs ~1.7 decode
steps on CPU. Computing draft logits for the N most frequent tokens only (FR-Spec style)
cuts that by V / N.

Exactness is untouched: the draft distribution q is the softmax over the N tokens (zero
elsewhere), drafts are sampled from that q and the verifier receives that q, so rejection
sampling still returns exactly the target distribution (a token outside the vocabulary is
simply never drafted; the residual distribution covers it). Only acceptance can drop, by at
most the target mass outside the vocabulary.

File: ``draft_vocab.json`` in the heads folder (``bebop draft-vocab`` writes it from the
target-sampled training data): ``ids`` = every token seen, most frequent in the continuations
first (then in the prompts), with their counts; the engine option ``draft_vocab_size: N`` uses
the first N.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bebop_vllm.errors import BebopError

DRAFT_VOCAB_FILE = "draft_vocab.json"


def token_counts(seqs: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Occurrences of each token id in the sampled continuations and in the prompts of a
    ``SequenceSet``: two int64 [vocab_size] arrays."""
    completion = np.zeros(vocab_size, dtype=np.int64)
    prompt = np.zeros(vocab_size, dtype=np.int64)
    for i in range(len(seqs)):
        seq, n = seqs.sequence(i), int(seqs.prompt_lens[i])
        completion += np.bincount(seq[n:], minlength=vocab_size)[:vocab_size]
        prompt += np.bincount(seq[:n], minlength=vocab_size)[:vocab_size]
    return completion, prompt


def ranked_ids(completion: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    """Every id seen, ranked by its count in continuations (drafts are continuation tokens),
    then by its count in prompts (outputs often copy the prompt), then by id."""
    seen = np.flatnonzero(completion + prompt)
    order = np.lexsort((seen, -prompt[seen], -completion[seen]))
    return seen[order]


def coverage(ids: np.ndarray, counts: np.ndarray) -> float:
    """Fraction of the counted tokens that fall inside ``ids``."""
    total = counts.sum()
    return float(counts[ids].sum() / total) if total else 0.0


def write_draft_vocab(heads_dir: str | Path, completion: np.ndarray, prompt: np.ndarray,
                      source: dict[str, Any]) -> Path:
    ids = ranked_ids(completion, prompt)
    if len(ids) == 0:
        raise BebopError("no tokens to build a draft vocabulary from (empty data)")
    path = Path(heads_dir) / DRAFT_VOCAB_FILE
    payload = {"source": source, "vocab_size": int(len(completion)), "completion_tokens": int(completion.sum()),
               "ids": ids.tolist(), "completion_counts": completion[ids].tolist(),
               "prompt_counts": prompt[ids].tolist()}
    path.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    return path


def read_draft_vocab(heads_dir: str | Path, size: int, vocab_size: int) -> list[int]:
    """The first ``size`` ids of the heads' draft vocabulary, ascending; BebopError naming the
    problem when the file is missing, malformed, too short or for another vocabulary."""
    path = Path(heads_dir) / DRAFT_VOCAB_FILE
    if not path.is_file():
        raise BebopError(
            f"draft_vocab_size={size} needs {path}: write it with `bebop draft-vocab --heads {heads_dir}` "
            "(token frequencies of the heads' training data)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        ids = [int(i) for i in payload["ids"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BebopError(f"{path} is not a valid draft vocabulary ({exc})") from None
    if payload.get("vocab_size") != vocab_size:
        raise BebopError(f"{path} was built for a vocabulary of {payload.get('vocab_size')} tokens; "
                         f"the target has {vocab_size}")
    if not 1 <= size <= len(ids):
        raise BebopError(f"draft_vocab_size={size}: {path} ranks {len(ids)} tokens (those seen in the "
                         f"training data); choose 1..{len(ids)}")
    chosen = ids[:size]
    if len(set(chosen)) != size or min(chosen) < 0 or max(chosen) >= vocab_size:
        raise BebopError(f"{path}: ids must be distinct and in [0, {vocab_size})")
    return sorted(chosen)


def write_probability_ranked_vocab(
    heads_dir: str | Path,
    ranking: np.ndarray,
    mass: np.ndarray,
    trained_size: int | None,
    source: dict[str, Any],
) -> Path:
    """``draft_vocab.json`` ranked by summed target probability (the trainer's ranking: the
    tokens carrying most of the target's mass on its own samples come first, which maximises
    the mass inside the first N, the cap on acceptance). ``trained_size``: the N the heads were
    trained on (serve with ``draft_vocab_size`` <= N; outside it their logits are untrained)."""
    total = float(mass.sum())
    if total <= 0:
        raise BebopError("no target probability mass to rank a draft vocabulary by (empty data)")
    path = Path(heads_dir) / DRAFT_VOCAB_FILE
    cum = np.cumsum(mass[ranking]) / total
    payload = {
        "source": source,
        "ranked_by": "summed target probability over the train completions",
        "vocab_size": int(len(mass)),
        "trained_size": trained_size,
        "coverage": {str(n): round(float(cum[n - 1]), 5) for n in (2048, 4096, 8192, 12288, 16384, 24576, 32768)
                     if n <= len(cum)},
        "ids": [int(i) for i in ranking],
    }
    path.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    return path


def trained_draft_vocab_size(heads_dir: str | Path) -> int | None:
    """The draft vocabulary size the heads were trained on (``trained_size`` in their
    ``draft_vocab.json``), or None: heads without one (or trained on the full vocabulary)."""
    path = Path(heads_dir) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    try:
        size = json.loads(path.read_text(encoding="utf-8")).get("trained_size")
    except (OSError, ValueError):
        return None  # read_draft_vocab reports a broken file if the size is asked for
    return int(size) if size else None
