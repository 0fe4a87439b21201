"""``BebopRejectionSampler`` keeps vLLM 0.32's ``RejectionSampler`` contract, checked against vLLM.

Each comparison feeds vLLM's class and ours the very same inputs (metadata, logits, draft
probabilities, sampling metadata, bonus sampler) and, where the answer is random, the very same
acceptance uniforms (vLLM's ``generate_uniform_probs`` and our ``draw_uniforms`` are replaced by
one shared tensor). What "the same answer" means:

- greedy requests are deterministic: outputs equal, bit for bit;
- random requests: the accept / reject decision at every position is a pure function of the
  uniform and p / q, so the accepted prefix, the rejected position and the bonus token must be
  equal. The token emitted at a rejection is drawn by different samplers (vLLM: exponential
  race; ours: inverse CDF), so it must be equal where its distribution is a point mass and lie
  in that distribution's support otherwise; the distribution itself is tested at the end.

Also: vLLM's -1 padding of grammar-rejected drafts at every position, logits holding only the
draft rows (bonus tokens from the sampler, as vLLM's own tests drive it), layouts vLLM's
contract does not allow (a clear ValueError), seeded determinism in mixed batches, vLLM's
logits processors (top-k / top-p, penalties, bad words, allowed-token masks) reaching the
distribution we verify against, and a chi-square test, with its power and a negative control,
that the emitted tokens follow the target distribution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from bebop_vllm.kernels import draw_uniforms, rejection_torch
from bebop_vllm.kernels import rejection as bebop_rejection
from bebop_vllm.kernels.goodness_of_fit import chi_square_test, power_at, samples_for_power
from bebop_vllm.kernels.random_numbers import RejectionUniforms
from bebop_vllm.kernels.vllm_baseline import (
    cpu_expand_fixed,
    make_sampling_metadata,
    make_spec_decode_metadata,
    make_vllm_rejection_sampler,
)
from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample import rejection_sampler as vllm_rs
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler
from vllm.v1.sample.sampler import Sampler
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

from bebop_vllm.plugin.verifier import BebopRejectionSampler

PAD = PLACEHOLDER_TOKEN_ID


@pytest.fixture(scope="module", autouse=True)
def _cpu_platform() -> None:
    # Loads vLLM's CPU ops and routes its Triton kernels to their CPU fallbacks, as the
    # CPU worker does at start-up; needed before vLLM's RejectionSampler can run here.
    make_vllm_rejection_sampler()


@pytest.fixture(autouse=True)
def _expand_fix() -> Iterator[None]:
    # vLLM 0.32's CPU expand_batch_to_tokens returns garbage temperatures; the plugin patches
    # it in engines (cpu_expand_fix), so both verifiers run with the fix here too.
    with cpu_expand_fixed():
        yield


class FixedBonusSampler:
    """Stands in for vLLM's ``Sampler``: returns preset bonus tokens (vLLM's tests mock it so)."""

    logprobs_mode = "raw_logprobs"

    def __init__(self, bonus: list[int]) -> None:
        self.bonus = torch.tensor(bonus, dtype=torch.int64).view(-1, 1)

    def __call__(self, logits: torch.Tensor, sampling_metadata, predict_bonus_token: bool = False,
                 logprobs_mode_override: str | None = None) -> SamplerOutput:
        return SamplerOutput(sampled_token_ids=self.bonus.clone(), logprobs_tensors=None)


def draft_rows_only_metadata(drafts: list[list[int]]) -> SpecDecodeMetadata:
    """Metadata for logits that hold the draft rows only (no bonus rows), as vLLM's tests build."""
    metadata = SpecDecodeMetadata.make_dummy(drafts, device=torch.device("cpu"))
    metadata.target_logits_indices = torch.arange(sum(len(d) for d in drafts), dtype=torch.int32)
    metadata.bonus_logits_indices = torch.empty(0, dtype=torch.int32)
    return metadata


def peaked_logits(rows: list[int], vocab: int) -> torch.Tensor:
    """[len(rows), V] logits whose softmax is a point mass at ``rows[i]`` in float32."""
    logits = torch.full((len(rows), vocab), -100.0)
    logits[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.long)] = 100.0
    return logits


def greedy_sampling(batch: int):
    return make_sampling_metadata(torch.zeros(batch))


@contextlib.contextmanager
def shared_uniforms(accept: torch.Tensor, final: torch.Tensor | None = None) -> Iterator[None]:
    """Both verifiers draw ``accept`` [Nd] float64 as their acceptance uniforms."""
    original_vllm, original_ours = vllm_rs.generate_uniform_probs, bebop_rejection.draw_uniforms

    def vllm_draw(num_tokens, num_draft_tokens, generators, device):
        assert num_tokens == accept.shape[0]
        return accept.clone()

    def our_draw(total_draft_tokens, batch_size, device, generator=None):
        assert total_draft_tokens == accept.shape[0]
        fin = final if final is not None else torch.full((batch_size,), 0.5, dtype=torch.float64)
        return RejectionUniforms(accept=accept.clone(), final=fin.clone())

    vllm_rs.generate_uniform_probs = vllm_draw
    bebop_rejection.draw_uniforms = our_draw
    try:
        yield
    finally:
        vllm_rs.generate_uniform_probs = original_vllm
        bebop_rejection.draw_uniforms = original_ours


def run_both(sampler, metadata, draft_probs, logits, sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """(vLLM's output, ours) on identical inputs; each gets its own copy of mutable tensors."""
    theirs = RejectionSampler(sampler)(
        metadata, None if draft_probs is None else draft_probs.clone(), logits.clone(), sampling
    ).sampled_token_ids
    ours_verifier = BebopRejectionSampler(sampler)
    ours = ours_verifier(
        metadata, None if draft_probs is None else draft_probs.clone(), logits.clone(), sampling
    ).sampled_token_ids
    assert ours.dtype == torch.int32 and ours.shape == theirs.shape
    return theirs, ours


def accepted_counts(output: torch.Tensor, num_draft: list[int]) -> list[int]:
    """Drafts accepted per request from a verifier output [B, max_k + 1] (emitted - 1)."""
    return [int((row != PAD).sum()) - 1 for row in output]


# ----------------------------------------------------------------------------- greedy


GREEDY_CASES = {
    # name: (drafts per request, target argmax per draft row, bonus per request, expected)
    "perfect_match": ([[1, 2, 3]], [1, 2, 3], [4], [[1, 2, 3, 4]]),
    "early_mismatch": ([[1, 2, 3]], [1, 5, 3], [4], [[1, 5, PAD, PAD]]),
    "first_mismatch": ([[1]], [2], [3], [[2, PAD]]),
    "multiple_sequences": ([[1, 2], [3]], [1, 2, 3], [5, 4], [[1, 2, 5], [3, 4, PAD]]),
    "multiple_mismatches": (
        [[1, 2, 3], [4, 5, 6]], [1, 2, 7, 4, 8, 6], [6, 9], [[1, 2, 7, PAD], [4, 8, PAD, PAD]],
    ),
    "empty_drafts": ([[]], [], [5], [[5]]),
    "ragged_with_empty": ([[1, 2], [], [7, 8, 9]], [1, 3, 7, 8, 9], [10, 11, 12], [
        [1, 3, PAD, PAD], [11, PAD, PAD, PAD], [7, 8, 9, 12],
    ]),
}


@pytest.mark.parametrize("case", sorted(GREEDY_CASES))
def test_greedy_draft_rows_only_matches_vllm(case: str) -> None:
    drafts, argmax, bonus, expected = GREEDY_CASES[case]
    logits = peaked_logits(argmax, vocab=20)
    theirs, ours = run_both(FixedBonusSampler(bonus), draft_rows_only_metadata(drafts), None, logits,
                            greedy_sampling(len(drafts)))
    assert theirs.tolist() == expected  # the case says what vLLM does ...
    assert ours.tolist() == expected  # ... and ours does the same


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_greedy_runner_layout_with_real_sampler_matches_vllm(with_draft_probs: bool) -> None:
    """Model-runner layout (draft rows then bonus row), vLLM's Sampler choosing the bonus, ties."""
    ks, vocab = [3, 0, 2, 4, 1], 50
    gen = torch.Generator().manual_seed(0)
    rows = sum(ks) + len(ks)
    logits = torch.randint(-2, 3, (rows, vocab), generator=gen).float()  # many argmax ties
    metadata = make_spec_decode_metadata(torch.zeros(sum(ks), dtype=torch.long), ks)
    argmax = logits[metadata.target_logits_indices.long()].argmax(-1)
    drafts = argmax.clone()
    drafts[[1, 4, 7]] = (drafts[[1, 4, 7]] + 1) % vocab  # some mismatches
    metadata = make_spec_decode_metadata(drafts, ks)
    draft_probs = torch.softmax(torch.randn(sum(ks), vocab, generator=gen), -1) if with_draft_probs else None
    theirs, ours = run_both(Sampler(), metadata, draft_probs, logits, greedy_sampling(len(ks)))
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- -1 drafts


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("layout", ["draft_rows_only", "runner"])
def test_greedy_invalid_draft_rejected_at_its_position(position: int, layout: str) -> None:
    drafts = [[4, 5, 6], [7, 8]]
    drafts[0][position] = -1
    argmax = [4, 5, 6, 7, 8]  # every valid draft would be accepted
    vocab = 12
    if layout == "draft_rows_only":
        metadata = draft_rows_only_metadata(drafts)
        logits, sampler = peaked_logits(argmax, vocab), FixedBonusSampler([10, 11])
    else:
        metadata = make_spec_decode_metadata(torch.tensor(sum(drafts, [])), [3, 2])
        logits, sampler = peaked_logits([4, 5, 6, 10, 7, 8, 11], vocab), Sampler()
    theirs, ours = run_both(sampler, metadata, None, logits, greedy_sampling(2))
    expected_first = argmax[:position + 1] + [PAD] * (3 - position)
    assert theirs[0].tolist() == expected_first
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_random_invalid_draft_rejected_at_its_position(position: int, with_draft_probs: bool) -> None:
    """Random requests, point-mass targets: the recovered token after -1 is forced, so equal."""
    vocab = 16
    drafts = [[3, 4, 5], [6, 7, 8]]
    drafts[1][position] = -1
    target = [3, 4, 5, 6, 7, 8]
    logits = peaked_logits(target, vocab)
    draft_probs = None
    if with_draft_probs:
        # q puts mass on the drafted token and elsewhere, never on the target's point mass of
        # the invalid position, so the residual max(p - q, 0) is that point mass.
        draft_probs = torch.full((6, vocab), 0.5 / (vocab - 2))
        for row, token in enumerate(sum(drafts, [])):
            draft_probs[row, target[row]] = 0.0
            if token >= 0:
                draft_probs[row, token] = 0.5
        draft_probs = draft_probs / draft_probs.sum(-1, keepdim=True)
    accept = torch.full((6,), 0.25, dtype=torch.float64)
    with shared_uniforms(accept):
        theirs, ours = run_both(FixedBonusSampler([9, 10]), draft_rows_only_metadata(drafts), draft_probs,
                                logits, make_sampling_metadata(torch.ones(2)))
    assert theirs[1, : position + 1].tolist() == target[3 : 4 + position]
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_invalid_draft_never_reads_a_neighbouring_row(with_draft_probs: bool) -> None:
    """-1 used as an index reads the previous row's last entry; make that entry p = 1.

    Expected values follow vLLM's contract (its Triton kernel: ``draft_token_id < 0`` ->
    rejected). vLLM 0.32's *CPU* fallback (C++ ``rejection_random_sample_kernel_impl``) does
    index with the -1 and here accepts it, so this case is pinned to the contract, not to
    what vLLM's class returns on this CPU.
    """
    vocab = 8
    logits = torch.full((2, vocab), -100.0)
    logits[0, vocab - 1] = 100.0  # row 0: all mass on the last token
    logits[1, 2] = 100.0  # row 1: all mass on token 2
    drafts = [[vocab - 1, -1]]
    draft_probs = torch.full((2, vocab), 1.0 / vocab) if with_draft_probs else None
    with shared_uniforms(torch.tensor([0.5, 0.5], dtype=torch.float64)):
        ours = BebopRejectionSampler(FixedBonusSampler([1]))(
            draft_rows_only_metadata(drafts), draft_probs, logits, make_sampling_metadata(torch.ones(1))
        ).sampled_token_ids
    assert ours.tolist() == [[vocab - 1, 2, PAD]]


# ----------------------------------------------------------------------------- random, smooth


def _smooth_problem(ks: list[int], vocab: int, seed: int, invalid_every: int = 0):
    gen = torch.Generator().manual_seed(seed)
    nd = sum(ks)
    logits = torch.randn(nd, vocab, generator=gen) * 1.5
    # p = 0 in the last column: vLLM's CPU fallback reads a -1 draft's p from the previous
    # row's last column (see test_invalid_draft_never_reads_a_neighbouring_row), so with 0
    # there its CPU answer is the contract's answer (reject) and the two can be compared.
    logits[:, -1] = -1e4
    q = torch.softmax(logits + torch.randn(nd, vocab, generator=gen), -1)
    x = torch.multinomial(q, 1, generator=gen).squeeze(1)
    if invalid_every:
        x[2::invalid_every] = -1  # mostly past the first position, so chains reach them
    accept = torch.rand(nd, generator=gen, dtype=torch.float64)
    return logits, q, x, accept


def _check_random_agreement(theirs: torch.Tensor, ours: torch.Tensor, ks: list[int], x: torch.Tensor,
                            bonus: list[int], support: list[torch.Tensor]) -> None:
    """Equal accepted prefixes and bonus tokens; a recovered token inside its support."""
    assert accepted_counts(ours, ks) == accepted_counts(theirs, ks)
    start = 0
    for i, k in enumerate(ks):
        n = accepted_counts(ours, ks)[i]
        assert ours[i, :n].tolist() == x[start:start + n].tolist() == theirs[i, :n].tolist()
        if n == k:
            assert int(ours[i, k]) == int(theirs[i, k]) == bonus[i]
        else:
            token = int(ours[i, n])
            assert bool(support[start + n][token]), f"request {i}: token {token} outside the residual"
        start += k


@pytest.mark.parametrize("with_draft_probs", [False, True])
@pytest.mark.parametrize("invalid_every", [0, 4])
def test_random_ragged_batch_decisions_match_vllm(with_draft_probs: bool, invalid_every: int) -> None:
    ks, vocab = [3, 0, 5, 1, 2, 4, 0, 3], 64
    logits, q, x, accept = _smooth_problem(ks, vocab, seed=1, invalid_every=invalid_every)
    if not with_draft_probs:
        # one-hot drafts: make p(x) large enough that chains often get accepted
        logits[torch.arange(x.shape[0]), x.clamp(min=0)] += 3.0
    bonus = list(range(40, 40 + len(ks)))
    p = torch.softmax(logits, -1)
    if with_draft_probs:
        removed = q  # vLLM's residual uses the q row, also at a -1 position
    else:
        # one-hot q at the draft; a -1 draft is one-hot on no token and removes nothing
        removed = torch.nn.functional.one_hot(x.clamp(min=0), vocab).float() * (x >= 0).unsqueeze(1)
    support = list((p - removed).clamp(min=0) > 0)
    with shared_uniforms(accept):
        theirs, ours = run_both(FixedBonusSampler(bonus), draft_rows_only_metadata(
            [x[sum(ks[:i]):sum(ks[:i + 1])].tolist() for i in range(len(ks))]),
            q if with_draft_probs else None, logits, make_sampling_metadata(torch.ones(len(ks))))
    _check_random_agreement(theirs, ours, ks, x, bonus, support)
    counts = accepted_counts(ours, ks)
    assert 0 < sum(counts) < sum(ks), "the case must exercise both acceptance and rejection"


def test_mixed_greedy_and_random_runner_layout_matches_vllm() -> None:
    """Greedy rows (temperature 0) and random rows (T = 0.7) in one batch, real Sampler."""
    ks, vocab = [2, 3, 0, 4], 40
    gen = torch.Generator().manual_seed(4)
    rows = sum(ks) + len(ks)
    logits = torch.randn(rows, vocab, generator=gen) * 2
    metadata0 = make_spec_decode_metadata(torch.zeros(sum(ks), dtype=torch.long), ks)
    x = logits[metadata0.target_logits_indices.long()].argmax(-1)
    x[[2, 5]] = -1
    metadata = make_spec_decode_metadata(x, ks)
    temperature = torch.tensor([0.0, 0.7, 0.0, 0.7])
    accept = torch.rand(sum(ks), generator=gen, dtype=torch.float64)
    sampling = make_sampling_metadata(temperature)
    # The random bonus token is sampled by vLLM's Sampler: seed it identically for both.
    torch.manual_seed(11)
    with shared_uniforms(accept):
        theirs = RejectionSampler(Sampler())(metadata, None, logits.clone(), sampling).sampled_token_ids
    torch.manual_seed(11)
    with shared_uniforms(accept):
        ours = BebopRejectionSampler(Sampler())(metadata, None, logits.clone(), sampling).sampled_token_ids
    for i in (0, 2):  # greedy requests: bit for bit
        assert torch.equal(ours[i], theirs[i])
    assert accepted_counts(ours, ks) == accepted_counts(theirs, ks)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("batch", [1, 3])
def test_draft_rows_only_random_bonus_comes_from_the_sampler(batch: int) -> None:
    """Empty bonus_logits_indices, bonus from the sampler: the bonus token is the sampler's."""
    vocab = 10
    drafts = [[2, 3]] * batch
    logits = peaked_logits([2, 3] * batch, vocab)
    bonus = [7 + i for i in range(batch)]
    with shared_uniforms(torch.full((2 * batch,), 0.5, dtype=torch.float64)):
        theirs, ours = run_both(FixedBonusSampler(bonus), draft_rows_only_metadata(drafts), None, logits,
                                make_sampling_metadata(torch.ones(batch)))
    assert theirs.tolist() == [[2, 3, b] for b in bonus]
    assert torch.equal(ours, theirs)


def test_permuted_layout_matches_vllm() -> None:
    """Any layout the indices describe: bonus rows first, then the draft rows in reverse order."""
    ks, vocab = [2, 1, 3], 30
    gen = torch.Generator().manual_seed(5)
    nd, batch = sum(ks), len(ks)
    logits = torch.randn(nd + batch, vocab, generator=gen) * 3
    target_rows = torch.arange(nd + batch - 1, batch - 1, -1)  # draft rows stored reversed after bonus rows
    x = logits[target_rows].argmax(-1)
    x[1] = (x[1] + 1) % vocab
    metadata = make_spec_decode_metadata(x, ks)
    metadata.target_logits_indices = target_rows.to(torch.int32)
    metadata.bonus_logits_indices = torch.arange(batch, dtype=torch.int32)
    theirs, ours = run_both(Sampler(), metadata, None, logits, greedy_sampling(batch))
    assert torch.equal(ours, theirs)
    assert ours[2].tolist()[:4] == x[3:6].tolist() + [int(logits[2].argmax())]


def test_missing_bonus_tokens_fail_clearly() -> None:
    """Draft rows only but the real Sampler (0 bonus tokens for 2 requests): vLLM reads out of
    bounds; ours refuses with a message rather than emitting some token."""
    drafts = [[1], [2]]
    with pytest.raises(ValueError, match="bonus sampler returned 0 tokens for 2 requests"):
        BebopRejectionSampler(Sampler())(draft_rows_only_metadata(drafts), None, peaked_logits([1, 2], 8),
                                         greedy_sampling(2))


def test_target_rows_must_match_drafts() -> None:
    metadata = draft_rows_only_metadata([[1, 2], [3]])
    metadata.target_logits_indices = torch.arange(2, dtype=torch.int32)  # 2 rows for 3 drafts
    with pytest.raises(ValueError, match="selects 2 logits rows for 3 draft tokens"):
        BebopRejectionSampler(FixedBonusSampler([0, 0]))(metadata, None, peaked_logits([1, 2, 3], 8),
                                                         greedy_sampling(2))


def test_draft_probs_shape_must_match() -> None:
    with pytest.raises(ValueError, match="draft_probs has shape"):
        BebopRejectionSampler(FixedBonusSampler([0]))(
            draft_rows_only_metadata([[1, 2]]), torch.full((1, 8), 1 / 8), peaked_logits([1, 2], 8),
            make_sampling_metadata(torch.ones(1)))


# ----------------------------------------------------------------------------- seeds


def test_seeded_requests_reproducible_among_unseeded_ones() -> None:
    ks, vocab = [3, 2, 3, 1, 0, 3], 200
    gen = torch.Generator().manual_seed(6)
    rows = sum(ks) + len(ks)
    logits = torch.randn(rows, vocab, generator=gen)
    meta0 = make_spec_decode_metadata(torch.zeros(sum(ks), dtype=torch.long), ks)
    draft_probs = torch.softmax(logits[meta0.target_logits_indices.long()] + torch.randn(sum(ks), vocab,
                                                                                           generator=gen), -1)
    x = torch.multinomial(draft_probs, 1, generator=gen).squeeze(1)
    metadata = make_spec_decode_metadata(x, ks)
    seeded = {0: 123, 3: 7, 4: 99}
    verifier = BebopRejectionSampler(Sampler())
    outputs = []
    for _ in range(6):
        generators = {i: torch.Generator().manual_seed(s) for i, s in seeded.items()}
        sampling = make_sampling_metadata(torch.ones(len(ks)), generators=generators)
        outputs.append(verifier(metadata, draft_probs, logits.clone(), sampling).sampled_token_ids)
    for out in outputs[1:]:
        for i in seeded:
            assert torch.equal(out[i], outputs[0][i])
    unseeded = [i for i in range(len(ks)) if i not in seeded]
    assert any(not torch.equal(out[unseeded], outputs[0][unseeded]) for out in outputs[1:]), (
        "unseeded requests never varied: the test would not see a broken seed"
    )


def test_seeded_request_ignores_its_neighbours() -> None:
    """The same seeded request gives the same output whatever the other requests are."""
    vocab = 100
    gen = torch.Generator().manual_seed(8)
    mine = torch.randn(4, vocab, generator=gen)  # 3 draft rows + bonus row
    q = torch.softmax(mine[:3] + torch.randn(3, vocab, generator=gen), -1)
    x = torch.multinomial(q, 1, generator=gen).squeeze(1)
    results = []
    for other_k in (1, 4):
        other = torch.randn(other_k + 1, vocab, generator=gen)
        other_q = torch.softmax(torch.randn(other_k, vocab, generator=gen), -1)
        other_x = torch.multinomial(other_q, 1, generator=gen).squeeze(1)
        logits = torch.cat([other, mine])
        metadata = make_spec_decode_metadata(torch.cat([other_x, x]), [other_k, 3])
        sampling = make_sampling_metadata(torch.ones(2), generators={1: torch.Generator().manual_seed(42)})
        out = BebopRejectionSampler(Sampler())(metadata, torch.cat([other_q, q]), logits, sampling)
        results.append(out.sampled_token_ids[1, :4])
    assert torch.equal(results[0], results[1])


# ----------------------------------------------------------------------------- processors


def _entropy_of_vllm_processed(metadata, logits, sampling) -> torch.Tensor:
    """Entropy of the distribution vLLM's own verifier samples the draft rows from."""
    verifier = RejectionSampler(FixedBonusSampler([0] * len(metadata.num_draft_tokens)))
    target = logits[metadata.target_logits_indices].float().clone()
    target = verifier.apply_logits_processors(target, sampling, metadata)
    target = vllm_rs.apply_sampling_constraints(target, metadata.cu_num_draft_tokens, sampling)
    p = torch.softmax(target, -1)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def _processor_case(kind: str):
    """Batch of 6 random requests whose drafts are the *raw* argmax; ``kind`` bans some of them."""
    ks, vocab = [2, 3, 1, 2, 3, 2], 48
    gen = torch.Generator().manual_seed(9)
    nd, batch = sum(ks), len(ks)
    logits = torch.randn(nd, vocab, generator=gen) * 2
    x = logits.argmax(-1)
    drafts = [x[sum(ks[:i]):sum(ks[:i + 1])].tolist() for i in range(batch)]
    temperature = torch.full((batch,), 0.8)
    sampling = make_sampling_metadata(temperature)
    banned: dict[int, set[int]] = {}
    if kind == "top_k_top_p":
        sampling.top_k = torch.tensor([1, 5, 48, 2, 48, 3], dtype=torch.int32)
        sampling.top_p = torch.tensor([1.0, 0.5, 0.3, 1.0, 0.9, 0.6])
    elif kind == "bad_words":
        sampling.bad_words_token_ids = {i: [[d[0]]] for i, d in enumerate(drafts) if i % 2 == 0}
        banned = {i: {d[0]} for i, d in enumerate(drafts) if i % 2 == 0}
        sampling.spec_token_ids = drafts
        sampling.output_token_ids = [[1, 2] for _ in range(batch)]
    elif kind == "allowed_tokens":
        mask = torch.zeros(batch, vocab, dtype=torch.bool)  # True = not allowed (vLLM's convention)
        for i, d in enumerate(drafts):
            mask[i, d[-1]] = True
            banned[i] = {d[-1]}
        sampling.allowed_token_ids_mask = mask
    elif kind == "penalties":
        sampling.no_penalties = False
        sampling.prompt_token_ids = torch.tensor([d[:1] + [vocab] for d in drafts])  # vocab = padding
        sampling.output_token_ids = [[d[-1]] for d in drafts]
        sampling.spec_token_ids = drafts
        sampling.repetition_penalties = torch.full((batch,), 3.0)
        sampling.frequency_penalties = torch.full((batch,), 1.0)
        sampling.presence_penalties = torch.full((batch,), 0.5)
    return ks, vocab, logits, x, drafts, sampling, banned


@pytest.mark.parametrize("kind", ["top_k_top_p", "bad_words", "allowed_tokens", "penalties"])
def test_processors_reach_the_verified_distribution(kind: str) -> None:
    ks, vocab, logits, x, drafts, sampling, banned = _processor_case(kind)
    metadata = draft_rows_only_metadata(drafts)
    bonus = [vocab - 1] * len(ks)
    # Drafts are the raw argmax: without the processors nearly every draft would be accepted
    # with these uniforms; with them vLLM rejects some. Equal decisions need the same p.
    accept = torch.linspace(0.05, 0.95, sum(ks), dtype=torch.float64)
    with shared_uniforms(accept):
        theirs = RejectionSampler(FixedBonusSampler(bonus))(metadata, None, logits.clone(), sampling)
        ours_verifier = BebopRejectionSampler(FixedBonusSampler(bonus))
        ours = ours_verifier(metadata, None, logits.clone(), sampling)
    assert accepted_counts(ours.sampled_token_ids, ks) == accepted_counts(theirs.sampled_token_ids, ks)
    assert sum(accepted_counts(ours.sampled_token_ids, ks)) < sum(ks), "processors must change something"
    for i, tokens in banned.items():
        assert not set(ours.sampled_token_ids[i].tolist()) & tokens
    expected = _entropy_of_vllm_processed(metadata, logits, sampling)
    torch.testing.assert_close(ours_verifier.last_target_entropy, expected, rtol=1e-4, atol=1e-4)


def test_entropy_check_can_fail_without_processors() -> None:
    """Control for the test above: the entropy of the unprocessed rows is measurably different."""
    ks, vocab, logits, x, drafts, sampling, banned = _processor_case("top_k_top_p")
    metadata = draft_rows_only_metadata(drafts)
    plain = make_sampling_metadata(sampling.temperature)
    assert not torch.allclose(_entropy_of_vllm_processed(metadata, logits, plain),
                              _entropy_of_vllm_processed(metadata, logits, sampling), atol=1e-2)


# ----------------------------------------------------------------------------- distribution

ALPHA = 1e-3
N_CHAINS = 30_000
VOCAB_DIST = 12
TV_DETECTABLE = 0.025


def _first_token_samples(p_logits: torch.Tensor, q: torch.Tensor, allowed: torch.Tensor | None,
                         seed: int) -> torch.Tensor:
    """First emitted token of N_CHAINS independent requests through BebopRejectionSampler.

    Each request: k = 2, target logits rows ``p_logits [3, V]`` (draft rows + bonus row),
    drafts x_j ~ q_j with ``q [2, V]`` handed to the verifier as draft_probs.
    ``allowed`` [V] bool (True = allowed): the allowed-token mask, and drafts outside it are
    replaced by -1 as vLLM's scheduler does for grammar-rejected drafts.
    """
    gen = torch.Generator().manual_seed(seed)
    n, k = N_CHAINS, 2
    logits = p_logits.repeat(n, 1)
    x = torch.multinomial(q, n, replacement=True, generator=gen).T.contiguous()  # [n, k]
    if allowed is not None:
        x = torch.where(allowed[x], x, torch.full_like(x, -1))
    metadata = make_spec_decode_metadata(x.flatten(), [k] * n)
    sampling = make_sampling_metadata(torch.ones(n))
    if allowed is not None:
        sampling.allowed_token_ids_mask = (~allowed).unsqueeze(0).expand(n, -1).contiguous()
    torch.manual_seed(seed)
    out = BebopRejectionSampler(Sampler())(metadata, q.repeat(n, 1), logits, sampling).sampled_token_ids
    return out[:, 0]


def _dist_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p_logits = torch.randn(3, VOCAB_DIST, generator=gen)
    q = torch.softmax(torch.randn(2, VOCAB_DIST, generator=gen) * 1.5, -1)
    return p_logits, q


def test_distribution_test_has_power() -> None:
    """State the power: n = 30,000 chains, V = 12 (dof <= 11), ALPHA = 1e-3.

    Worst-case power against any sampler off by TV >= 0.025 is >= 0.99 (non-centrality
    n (2 TV)^2 = 75); samples_for_power says ~21,000 chains would already do.
    """
    assert power_at(N_CHAINS, TV_DETECTABLE, VOCAB_DIST - 1, ALPHA) >= 0.99
    assert samples_for_power(TV_DETECTABLE, VOCAB_DIST - 1, ALPHA, 0.99) <= N_CHAINS


def test_emitted_tokens_follow_the_target() -> None:
    p_logits, q = _dist_problem(seed=10)
    samples = _first_token_samples(p_logits, q, None, seed=11)
    result = chi_square_test(samples, torch.softmax(p_logits[0], -1))
    assert result.p_value > ALPHA, result


def test_emitted_tokens_follow_the_masked_target_with_invalid_drafts() -> None:
    """Allowed-token mask on the target; drafts from the unmasked q, the disallowed ones sent
    as -1 (vLLM's grammar padding). Output must follow the masked target."""
    p_logits, q = _dist_problem(seed=12)
    allowed = torch.ones(VOCAB_DIST, dtype=torch.bool)
    allowed[[0, 3, 7]] = False
    samples = _first_token_samples(p_logits, q, allowed, seed=13)
    masked = torch.softmax(p_logits[0].masked_fill(~allowed, float("-inf")), -1)
    result = chi_square_test(samples, masked)
    assert result.p_value > ALPHA, result


def test_negative_control_residual_without_q_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A verifier that resamples from p instead of max(p - q, 0) after a rejection emits
    min(p, q) + (1 - alpha) p, here far beyond the detectable TV: the same test must fail."""
    p_logits, q = _dist_problem(seed=10)
    p = torch.softmax(p_logits[0], -1)
    wrong = torch.minimum(p, q[0]) + (1 - torch.minimum(p, q[0]).sum()) * p
    assert 0.5 * float((wrong - p).abs().sum()) > 2 * TV_DETECTABLE

    def residual_ignores_q(p_final, rejected, rejected_draft_index, safe_ids, valid, draft_probs):
        return p_final

    monkeypatch.setattr(rejection_torch, "emitted_weights", residual_ignores_q)
    samples = _first_token_samples(p_logits, q, None, seed=11)
    assert chi_square_test(samples, p).p_value < ALPHA


def test_draw_uniforms_is_what_the_kernels_consume() -> None:
    """Guard for ``shared_uniforms``: replacing draw_uniforms must change the verifier's output,
    otherwise every 'same uniforms' comparison above would compare unrelated draws."""
    ks, vocab = [4, 4], 32
    logits, q, x, _ = _smooth_problem(ks, vocab, seed=14)
    metadata = draft_rows_only_metadata([x[:4].tolist(), x[4:].tolist()])
    outs = []
    for u in (0.0, 1.0 - 1e-12):
        with shared_uniforms(torch.full((8,), u, dtype=torch.float64)):
            outs.append(BebopRejectionSampler(FixedBonusSampler([1, 2]))(
                metadata, q, logits.clone(), make_sampling_metadata(torch.ones(2))).sampled_token_ids)
    assert accepted_counts(outs[0], ks) == [4, 4]  # u = 0 accepts every draft with q > 0
    assert accepted_counts(outs[1], ks) != [4, 4]
    assert draw_uniforms is bebop_rejection.draw_uniforms  # restored


def test_all_greedy_with_no_temperature_tensor() -> None:
    """vLLM allows ``temperature=None`` when every request is greedy (its own tests do that)."""
    drafts, argmax, bonus, expected = GREEDY_CASES["multiple_mismatches"]
    sampling = greedy_sampling(len(drafts))
    sampling.temperature = None
    theirs, ours = run_both(FixedBonusSampler(bonus), draft_rows_only_metadata(drafts), None,
                            peaked_logits(argmax, vocab=20), sampling)
    assert ours.tolist() == theirs.tolist() == expected


def test_seeded_request_without_drafts_leaves_its_generator_alone() -> None:
    """As vLLM's generate_uniform_probs: a k = 0 seeded request draws nothing in the verifier
    (its bonus token comes from the sampler), so its generator advances as in plain decoding."""
    from bebop_vllm.kernels import draw_uniforms_for_requests

    ks = [2, 0, 1]
    for draw in (
        lambda gens: vllm_rs.generate_uniform_probs(sum(ks), ks, gens, torch.device("cpu")),
        lambda gens: draw_uniforms_for_requests(ks, torch.device("cpu"), gens, skip_requests_without_drafts=True),
    ):
        gens = {0: torch.Generator().manual_seed(1), 1: torch.Generator().manual_seed(2)}
        before = [g.get_state().clone() for g in gens.values()]
        draw(gens)
        assert not torch.equal(gens[0].get_state(), before[0])  # k = 2: drew
        assert torch.equal(gens[1].get_state(), before[1])  # k = 0: untouched


# ----------------------------------------------------------------------------- no drafts in the step


def no_draft_case(batch: int, vocab: int, seed: int):
    """A step in which no request drafts (draft_length="auto" in a crowd): metadata, logits [B, V]."""
    metadata = SpecDecodeMetadata.make_dummy([[] for _ in range(batch)], device=torch.device("cpu"))
    # The runner's layout (GPUModelRunner._calc_spec_decode_metadata): bonus row of request i at
    # cu_num_sampled_tokens[i] - 1 = i (make_dummy leaves them all 0, a profiling placeholder).
    metadata.bonus_logits_indices = torch.arange(batch, dtype=torch.int32)
    metadata.logits_indices = torch.arange(batch, dtype=torch.int32)
    assert metadata.max_spec_len == 0
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    return metadata, logits


@pytest.mark.parametrize("kind", ["greedy", "random", "mixed"])
@pytest.mark.parametrize("num_logprobs", [None, 3])
def test_step_without_drafts_matches_vllm(kind: str, num_logprobs: int | None) -> None:
    """A step without drafts is plain sampling (the verifier's shortcut calls vLLM's Sampler on
    the rows directly): tokens and logprobs equal vLLM's RejectionSampler's on the same inputs,
    with every request seeded so both draw the same random numbers."""
    batch, vocab = 5, 40
    metadata, logits = no_draft_case(batch, vocab, seed=3)
    temperature = {"greedy": torch.zeros(batch), "random": torch.full((batch,), 0.8),
                   "mixed": torch.tensor([0.0, 1.0, 0.0, 0.7, 1.3])}[kind]

    def sampling():
        gens = {i: torch.Generator().manual_seed(100 + i) for i in range(batch) if temperature[i] > 0}
        meta = make_sampling_metadata(temperature, generators=gens)
        meta.max_num_logprobs = num_logprobs
        return meta

    theirs = RejectionSampler(Sampler())(metadata, None, logits.clone(), sampling())
    verifier = BebopRejectionSampler(Sampler())
    ours = verifier(metadata, None, logits.clone(), sampling())
    assert ours.sampled_token_ids.dtype == torch.int32
    assert ours.sampled_token_ids.tolist() == theirs.sampled_token_ids.tolist()
    if kind == "greedy":
        assert ours.sampled_token_ids[:, 0].tolist() == logits.argmax(-1).tolist()
    assert verifier.last_target_entropy is not None and verifier.last_target_entropy.numel() == 0
    if num_logprobs is None:
        assert ours.logprobs_tensors is None
    else:
        for field in ("logprob_token_ids", "logprobs", "selected_token_ranks"):
            a, b = getattr(ours.logprobs_tensors, field), getattr(theirs.logprobs_tensors, field)
            assert a.shape == b.shape, field
            torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), msg=field)


def test_step_without_drafts_never_runs_the_accept_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut is taken: no rejection kernel and no [B, V] row copy for absent drafts."""
    metadata, logits = no_draft_case(batch=4, vocab=30, seed=1)

    def fail(*args, **kwargs):
        raise AssertionError("the accept step ran in a step without drafts")

    monkeypatch.setattr(BebopRejectionSampler, "_verify", fail)
    out = BebopRejectionSampler(Sampler())(metadata, None, logits, greedy_sampling(4))
    assert out.sampled_token_ids[:, 0].tolist() == logits.argmax(-1).tolist()
