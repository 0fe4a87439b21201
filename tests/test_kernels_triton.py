"""Triton kernels == torch reference for the same random numbers, run by Triton's interpreter.

Triton has no CPU backend, but ``TRITON_INTERPRET=1`` executes the kernels with numpy on CPU
tensors. The variable must be set before the kernels are defined, so the parent test re-runs
this file in a subprocess with it set; there the parametrised comparisons run (and in the
parent process they are skipped, their outcome being the parent test's). Shapes are small:
the interpreter runs every Triton op in Python.

Outputs are compared bit for bit: both paths consume the same uniforms and do the same
float32/float64 arithmetic; only summation order differs, which could flip a token only if
a uniform fell within a few ulps of a CDF boundary (fixed seeds keep this deterministic).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs in test_triton_kernels_match_torch_under_interpreter's subprocess"
)


def test_triton_kernels_match_torch_under_interpreter() -> None:
    if INTERPRETED:
        pytest.skip("this is the interpreter subprocess itself")
    import triton  # noqa: F401 - part of every install (cpu / gpu extra): a broken one must fail, not skip
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900,
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report


if INTERPRETED:
    from bebop_vllm.kernels import draw_uniforms, rejection_sample, rejection_sample_from_logits
    from bebop_vllm.kernels.random_numbers import RejectionUniforms


def _problem(ks: list[int], vocab: int, seed: int, sharp: float):
    gen = torch.Generator().manual_seed(seed)
    rows, drafts = sum(ks) + len(ks), sum(ks)
    logits = torch.randn(rows, vocab, generator=gen) * sharp
    p = logits.softmax(-1)
    q = torch.softmax(torch.randn(drafts, vocab, generator=gen) * sharp, dim=-1)
    # Make some drafts good so that chains get past the first position.
    q[: drafts // 2] = 0.5 * q[: drafts // 2] + 0.5 * p[: drafts // 2]
    x = torch.multinomial(q, 1, generator=gen).squeeze(1) if drafts else torch.empty(0, dtype=torch.long)
    u = draw_uniforms(drafts, len(ks), torch.device("cpu"), gen)
    return logits, p, q, x, u


@in_interpreter
def test_interpreter_is_active() -> None:
    import triton

    assert triton.knobs.runtime.interpret


@in_interpreter
@pytest.mark.parametrize("one_hot", [False, True], ids=["draft-probs", "one-hot"])
@pytest.mark.parametrize(
    ("ks", "vocab"),
    [([2, 0, 3, 1], 7), ([1, 4], 1024), ([3, 0, 2], 1500), ([0, 0], 33), ([5, 1, 2], 2100)],
)
def test_probability_kernel_matches_torch(ks: list[int], vocab: int, one_hot: bool) -> None:
    _, p, q, x, u = _problem(ks, vocab, seed=vocab + len(ks), sharp=3.0)
    draft_probs = None if one_hot else q
    triton_out = rejection_sample(p, x, ks, draft_probs, uniforms=u, backend="triton")
    torch_out = rejection_sample(p, x, ks, draft_probs, uniforms=u, backend="torch")
    assert torch.equal(triton_out[0], torch_out[0])
    assert torch.equal(triton_out[1], torch_out[1])


@in_interpreter
@pytest.mark.parametrize("masked", [False, True], ids=["temperature", "top-k-top-p"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("ks", "vocab"), [([2, 0, 3, 1, 4], 1100), ([1, 2], 300)])
def test_fused_logits_kernels_match_torch(ks: list[int], vocab: int, dtype, masked: bool) -> None:
    logits, _, q, x, u = _problem(ks, vocab, seed=vocab, sharp=2.0)
    logits = logits.to(dtype)
    batch = len(ks)
    temperature = torch.linspace(0.5, 1.5, batch)
    temperature[0] = 0.0  # a greedy request in the batch
    kwargs = {}
    if masked:
        kwargs = dict(
            top_k=torch.tensor([5, vocab, 40, 200, 17][:batch]),
            top_p=torch.tensor([0.9, 0.8, 1.0, 0.5, 0.95][:batch]),
        )
    outs = [
        rejection_sample_from_logits(
            logits, x, ks, temperature, q, uniforms=u, return_entropy=True, backend=backend,
            **kwargs,
        )
        for backend in ("triton", "torch")
    ]
    assert torch.equal(outs[0].output_token_ids, outs[1].output_token_ids)
    assert torch.equal(outs[0].num_accepted, outs[1].num_accepted)
    torch.testing.assert_close(outs[0].entropy, outs[1].entropy, atol=5e-5, rtol=1e-5)


@in_interpreter
def test_uniform_extremes_match_torch() -> None:
    """u = 0 and u = 1 - 2^-53 at every position: the CDF ends, the acceptance edges."""
    ks = [2, 1, 3]
    _, p, q, x, _ = _problem(ks, 1030, seed=3, sharp=4.0)
    for value in (0.0, 1 - 2**-53):
        u = RejectionUniforms(
            accept=torch.full((sum(ks),), value, dtype=torch.float64),
            final=torch.full((len(ks),), value, dtype=torch.float64),
        )
        a = rejection_sample(p, x, ks, q, uniforms=u, backend="triton")
        b = rejection_sample(p, x, ks, q, uniforms=u, backend="torch")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        # The emitted (recovered or bonus) token has positive target probability.
        batch = torch.arange(len(ks))
        accepted = a[1].long()
        row = torch.tensor([0, 3, 5]) + accepted  # row_start of ks = [2, 1, 3]
        assert bool((p[row, a[0][batch, accepted].long()] > 0).all())


@in_interpreter
def test_entropy_kernel_handles_masked_rows() -> None:
    """Rows with -inf logits (vLLM's allowed-token masks) and a single finite logit."""
    ks = [1, 0]
    logits = torch.randn(3, 2500)
    logits[0, 100:] = float("-inf")
    logits[1, :] = float("-inf")
    logits[1, 2400] = 0.0
    x = torch.tensor([5])
    q = torch.full((1, 2500), 1 / 2500)
    u = draw_uniforms(1, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    temperature = torch.tensor([0.7, 1.0])
    outs = [
        rejection_sample_from_logits(
            logits, x, ks, temperature, q, uniforms=u, return_entropy=True, backend=backend
        )
        for backend in ("triton", "torch")
    ]
    assert torch.equal(outs[0].output_token_ids, outs[1].output_token_ids)
    torch.testing.assert_close(outs[0].entropy, outs[1].entropy, atol=5e-5, rtol=1e-5)
    assert float(outs[0].entropy[1]) == pytest.approx(0.0, abs=1e-6)
