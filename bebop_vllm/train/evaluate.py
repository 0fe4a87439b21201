"""Held-out evaluation: teacher-forced acceptance per depth and expected accepted length."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from bebop_vllm.errors import BebopError
from bebop_vllm.heads.metadata import HeldoutMetrics
from bebop_vllm.heads.module import BebopMTPHead
from bebop_vllm.kernels import expected_accepted_length
from bebop_vllm.train.chains import ChainBatch, sequence_chains
from bebop_vllm.train.dataset import SequenceSet
from bebop_vllm.train.losses import acceptance_rates
from bebop_vllm.train.target_cache import HiddenCache


@torch.no_grad()
def evaluate(
    head: BebopMTPHead,
    seqs: SequenceSet,
    cache: HiddenCache,
    indices: list[int],
    num_depths: int,
    temperature: float,
    progress: bool = True,
) -> HeldoutMetrics:
    """alpha_j = mean over chains with depth j of sum_v min(p_j, q_j); the expected accepted
    length is the mean over full-depth chains of 1 + sum_j prod_{i<=j} alpha_i (per chain, so
    correlations between depths count). A head with aux layers reads ``cache.features``
    (:func:`cache_head_inputs`); the target's distributions come from ``cache.hidden``."""
    reads = cache_head_inputs(head, cache, indices)
    head.eval()
    tally = _Tally(num_depths)
    for i in tqdm(indices, desc="held-out eval", leave=False, disable=not progress, dynamic_ncols=True):
        tokens = torch.from_numpy(seqs.sequence(i).astype("int64"))
        plen = int(seqs.prompt_lens[i])
        head_input = None if reads is None else reads(i)
        tally.add(sequence_chains(head, tokens, cache.hidden(i), plen, num_depths, temperature, head_input=head_input))
    head.train()
    return tally.metrics(len(indices), temperature)


def cache_head_inputs(
    head: BebopMTPHead, cache: HiddenCache, indices: list[int]
) -> Callable[[int], torch.Tensor] | None:
    """What ``head`` reads at depth 1 for sequence i of ``cache``: None for a plain head (it reads
    ``cache.hidden(i)``), ``cache.features`` for a head with aux layers, whose cache must hold
    that head's aux layers for every sequence of ``indices`` (else a BebopError says so)."""
    ids = head.shape.aux_layer_ids
    if not ids:
        return None
    if tuple(cache.aux_layer_ids) != ids:
        raise BebopError(
            f"the head reads the target's aux layers {list(ids)}, the target cache {cache.path.parent} holds "
            f"{list(cache.aux_layer_ids) or 'none'}: build it as HiddenCache(..., aux_layer_ids={ids}) and fill() "
            "it (one target pass; cached hidden states are kept)"
        )
    missing = [i for i in indices if i not in cache.aux_done]
    if missing:
        raise BebopError(
            f"{len(missing)} sequences (e.g. {missing[:5]}) have no cached features of the aux layers {list(ids)} "
            f"in {cache.path.parent}: call fill() on the cache for them first"
        )
    return cache.features


class _Tally:
    """Per-depth acceptance and per-chain expected tokens per verify step, summed over batches."""

    def __init__(self, num_depths: int) -> None:
        self.alpha_sum = torch.zeros(num_depths, dtype=torch.float64)
        self.alpha_cnt = torch.zeros(num_depths, dtype=torch.float64)
        self.tau_sum, self.tau_cnt = 0.0, 0

    def add(self, b: ChainBatch) -> None:
        alpha = acceptance_rates(b.draft_logits, b.target_probs).double()
        self.alpha_sum += torch.where(b.mask, alpha, 0.0).sum(0)
        self.alpha_cnt += b.mask.sum(0)
        full = b.mask.all(1)
        self.tau_sum += expected_accepted_length(alpha[full]).sum().item()
        self.tau_cnt += int(full.sum())

    def metrics(self, num_sequences: int, temperature: float) -> HeldoutMetrics:
        alphas = (self.alpha_sum / self.alpha_cnt.clamp_min(1)).tolist()
        return HeldoutMetrics(
            alphas=[round(a, 5) for a in alphas],
            expected_accepted_length=round(self.tau_sum / max(self.tau_cnt, 1), 5),
            num_chains=self.tau_cnt,
            num_sequences=num_sequences,
            temperature=temperature,
        )


def ranked_vocab(mass: np.ndarray) -> np.ndarray:
    """Every token id, most target probability mass first (ties: lower id first)."""
    return np.lexsort((np.arange(len(mass)), -mass))


@torch.no_grad()
def evaluate_vocab(
    head: BebopMTPHead,
    seqs: SequenceSet,
    cache: HiddenCache,
    indices: list[int],
    num_depths: int,
    vocab_ids: torch.Tensor | None = None,
    lm_head_rows: torch.Tensor | None = None,
    progress: bool = True,
    head_inputs: Callable[[int], torch.Tensor] | None = None,
) -> HeldoutMetrics:
    """Held-out acceptance of a head that drafts over the vocabulary ``vocab_ids`` (None: full),
    every completion chain, each sequence at its own sampling temperature: alpha_j = mean over
    chains with depth j of sum_{v in D} min(p_v, q_v) (q = 0 outside D, p exact); the expected
    tokens per verify step is the mean over full-depth chains of 1 + sum_j prod_{i<=j} alpha_i.
    ``head_inputs(i)``: what the head reads for sequence i (``vocab_chains``' ``head_input``;
    default: ``cache.features`` for a head with aux layers, whose cache must hold them)."""
    from bebop_vllm.train.chains import vocab_chains

    if head_inputs is None:
        head_inputs = cache_head_inputs(head, cache, indices)

    head.eval()
    tally = _Tally(num_depths)
    temps = set()
    for i in tqdm(indices, desc="held-out eval", leave=False, disable=not progress, dynamic_ncols=True):
        tokens = torch.from_numpy(seqs.sequence(i).astype("int64"))
        first = max(int(seqs.prompt_lens[i]) - 1, 0)
        if first >= len(tokens) - 1:
            continue
        temps.add(float(seqs.temperatures[i]))
        tally.add(
            vocab_chains(
                head,
                tokens,
                cache.hidden(i),
                cache.log_normaliser(i),
                first,
                num_depths,
                float(seqs.temperatures[i]),
                vocab_ids,
                lm_head_rows,
                None if head_inputs is None else head_inputs(i),
            )
        )
    head.train()
    return tally.metrics(len(indices), temps.pop() if len(temps) == 1 else float("nan"))
