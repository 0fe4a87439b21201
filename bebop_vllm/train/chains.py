"""Teacher-forced draft chains of one sequence, in the ``[N, g, ...]`` layout the losses take.

Chain t (t = the last committed position, from prompt_len - 1 to L - 2) drafts at depth j from
position t + j - 1, predicting token x_{t+j+1}; its target distribution is the target's
next-token distribution at position t + j, softmax(lm_head(h_{t+j}) / T). Depth j exists
while t + j <= L - 1 (its input token x_{t+j} exists); beyond that the chain is masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bebop_vllm.heads.module import BebopMTPHead


@dataclass
class ChainBatch:
    draft_logits: torch.Tensor  # [N, g, V], already divided by the temperature
    target_probs: torch.Tensor  # [N, g, V] float32, no grad
    target_ids: torch.Tensor  # [N, g] the sampled token each depth predicts (-1 past the end)
    mask: torch.Tensor  # [N, g] bool: depth exists (input token and target distribution exist)
    ce_mask: torch.Tensor  # [N, g] bool: ... and its label exists
    # feature loss (``vocab_chains(..., with_features=True)``): norm(r_j) [N, g, H] (with grad)
    # and the target's post-norm hidden state h_{t+j} at the position depth j predicts from
    draft_features: torch.Tensor | None = None
    target_features: torch.Tensor | None = None


@torch.no_grad()
def target_probs_at(head: BebopMTPHead, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(lm_head(h) / T) in fp32 for hidden [n, H] -> [n, V] (the target's tempered sampler)."""
    logits = hidden.float() @ head.lm_head_weight.float().T
    return torch.softmax(logits / temperature, dim=-1)


def sequence_chains(
    head: BebopMTPHead,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    prompt_len: int,
    num_depths: int,
    temperature: float,
    chain_starts: torch.Tensor | None = None,
    head_input: torch.Tensor | None = None,
) -> ChainBatch:
    """Draft logits (with grad) and target probabilities for the chains of one sequence.

    ``tokens`` [L] int64, ``hidden`` [L, H] target post-norm final hidden states,
    ``chain_starts``: which t to keep (default: every t in [prompt_len - 1, L - 2]). The head
    runs over the whole sequence (the prompt positions are attention context). ``head_input``
    [L, H']: what the head reads at depth 1 in place of ``hidden`` (as in :func:`vocab_chains`,
    e.g. an aux head's ``[aux, h]``); the target's distributions always come from ``hidden``.
    """
    length = tokens.shape[0]
    if chain_starts is None:
        chain_starts = torch.arange(max(prompt_len - 1, 0), length - 1)
    reads = hidden if head_input is None else head_input
    outs = head.unroll(
        tokens[1:][None], reads[:-1][None].to(head.fc.weight.dtype), num_depths,
        int(chain_starts.min()) if len(chain_starts) else 0,
    )
    depth = torch.arange(1, num_depths + 1)
    pos = chain_starts[:, None] + depth[None, :] - 1  # where depth j of chain t runs
    mask = pos <= length - 2
    pos = pos.clamp(max=length - 2)
    residual = torch.stack([outs[j][0, pos[:, j]] for j in range(num_depths)], dim=1)  # [N, g, H]
    draft_logits = head.logits(residual) / temperature
    # target distributions at positions t + j: computed once per distinct position, then gathered
    tpos = (chain_starts[:, None] + depth[None, :]).clamp(max=length - 1)
    needed, inverse = torch.unique(tpos, return_inverse=True)
    target_probs = target_probs_at(head, hidden[needed], temperature)[inverse]
    label_pos = chain_starts[:, None] + depth[None, :] + 1
    ce_mask = mask & (label_pos <= length - 1)
    target_ids = torch.where(ce_mask, tokens[label_pos.clamp(max=length - 1)], -1)
    return ChainBatch(draft_logits, target_probs, target_ids, mask, ce_mask)


def vocab_chains(
    head: BebopMTPHead,
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    log_normaliser: torch.Tensor,
    first_chain: int,
    num_depths: int,
    temperature: float,
    vocab_ids: torch.Tensor | None = None,
    lm_head_rows: torch.Tensor | None = None,
    head_input: torch.Tensor | None = None,
    with_features: bool = False,
) -> ChainBatch:
    """Every chain t in [``first_chain``, L - 2] of one sequence, with logits and target
    probabilities over the draft vocabulary D only (the trainer's fast path).

    ``tokens`` [L] int64; ``hidden`` [L, H] the target's post-norm final hidden states;
    ``log_normaliser`` [L] = logsumexp(lm_head(h) / T) over the FULL vocabulary (from the
    target cache), so ``target_probs`` are the target's exact probabilities p_v for v in D
    (summing to the mass inside D, <= 1) while q is a softmax over D, exactly what the engine
    drafts with ``draft_vocab_size`` (zero outside D). ``vocab_ids`` [|D|] (None: the full
    vocabulary) and ``lm_head_rows`` = lm_head[vocab_ids] (precomputed once by the caller).
    ``target_ids`` index into D (-1, and ``ce_mask`` False, where the label lies outside D).
    ``head_input`` [L, H'] is what the head reads at each position in place of ``hidden``
    (default: ``hidden``), e.g. ``hidden`` with auxiliary target features appended for a head
    whose ``unroll`` combines them; the target's distributions always come from ``hidden``.
    ``with_features``: also return norm(r_j) and the target's h_{t+j} (the feature loss's pair:
    depth j of chain t is scored against the target's distribution at t + j, whose logits are
    lm_head(h_{t+j}); the draft's are lm_head(norm(r_j))).
    """
    length = tokens.shape[0]
    starts = torch.arange(max(first_chain, 0), length - 1)
    w = head.lm_head_weight if lm_head_rows is None else lm_head_rows
    reads = hidden if head_input is None else head_input
    outs = head.unroll(tokens[1:][None], reads[:-1][None].to(head.fc.weight.dtype), num_depths, int(starts[0]))
    depth = torch.arange(1, num_depths + 1)
    pos = starts[:, None] + depth[None, :] - 1  # where depth j of chain t runs
    mask = pos <= length - 2
    pos = pos.clamp(max=length - 2)
    residual = torch.stack([outs[j][0, pos[:, j]] for j in range(num_depths)], dim=1)  # [N, g, H]
    features = head.norm(residual)
    normed = features / temperature if temperature != 1.0 else features  # [N, g, H], not [N, g, |D|]
    draft_logits = normed @ w.to(normed.dtype).T
    target_features = None
    if with_features:
        target_features = hidden[(starts[:, None] + depth[None, :]).clamp(max=length - 1)]
    with torch.no_grad():
        # depth j of chain t is scored against the target's distribution at position t + j:
        # rows t + 1 .. t + g of one [n, |D|] table, so target_probs is a strided view of it
        # (no [N, g, |D|] gather); the g - 1 rows past the end repeat the last one (masked)
        n, first = len(starts), int(starts[0]) + 1
        table = torch.empty(n + num_depths - 1, w.shape[0], device=hidden.device)
        z = (hidden[first:length].float() / temperature) @ w.float().T
        torch.exp(z.sub_(log_normaliser[first:length, None]), out=table[:n])
        table[n:] = table[n - 1]
        target_probs = table.as_strided((n, num_depths, w.shape[0]), (w.shape[0], w.shape[0], 1))
        label_pos = starts[:, None] + depth[None, :] + 1
        ce_mask = mask & (label_pos <= length - 1)
        labels = tokens[label_pos.clamp(max=length - 1)]
        if vocab_ids is not None:  # token id -> its index in D (-1 outside)
            index = torch.full((head.shape.vocab_size,), -1, dtype=torch.long)
            index[vocab_ids] = torch.arange(len(vocab_ids))
            labels = index[labels]
            ce_mask &= labels >= 0
        target_ids = torch.where(ce_mask, labels, -1)
    return ChainBatch(draft_logits, target_probs, target_ids, mask, ce_mask,
                      features if with_features else None, target_features)
