"""Head-training losses: Monte-Carlo agreement with the shipped rejection-sampling kernel, gradients,
alpha = 0 safety, masking. Small shapes: runs in a few seconds."""

from __future__ import annotations

import math

import pytest
import torch

from bebop_vllm.train import losses as L


def _rand_dists(n: int, g: int, v: int, seed: int, sharp: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, g, v, generator=gen) * sharp
    p = torch.softmax(torch.randn(n, g, v, generator=gen) * sharp, dim=-1)
    return z, p


def _simulate_accepted(p: torch.Tensor, q: torch.Tensor, sims: int, gen: torch.Generator) -> torch.Tensor:
    """Accepted-draft counts [sims] from the shipped verifier (``bebop_vllm.kernels.rejection_sample``).

    ``sims`` requests, each drafting x_j ~ q_j independently at depths j = 1..g (the teacher-forced
    setting the loss models: depth j's p and q do not depend on the drafted prefix); the kernel
    accepts with min(1, p_j(x)/q_j(x)) and stops at the first rejection.
    """
    from bebop_vllm.kernels import rejection_sample

    g, v = p.shape
    drafts = torch.stack([torch.multinomial(q[j], sims, replacement=True, generator=gen) for j in range(g)], 1)
    target = torch.cat([p, p[-1:]]).float().repeat(sims, 1)  # per request: g draft rows, then a bonus row
    _, num_accepted = rejection_sample(target.contiguous(), drafts.reshape(-1), [g] * sims,
                                       q.float().repeat(sims, 1).contiguous(), generator=gen)
    return num_accepted.float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_e2e_tv_matches_monte_carlo_chain_rejection_sampling(seed: int) -> None:
    g, v, sims = 3, 12, 40_000
    z, p = _rand_dists(1, g, v, seed, sharp=1.0)
    # make the draft close-ish to the target so deep depths matter
    z = torch.log(p) + 0.7 * z
    loss = L.e2e_tv_loss(z, p).item()
    acc = _simulate_accepted(p[0], torch.softmax(z[0], -1), sims, torch.Generator().manual_seed(100 + seed))
    mc = 1 - acc.mean().item() / g
    sigma = acc.std().item() / g / math.sqrt(sims)
    assert abs(loss - mc) < 4 * sigma, (loss, mc, sigma)
    assert 0.05 < loss < 0.95  # a non-trivial case


def test_e2e_tv_is_zero_when_draft_equals_target() -> None:
    _, p = _rand_dists(5, 3, 30, 0)
    assert L.e2e_tv_loss(torch.log(p), p).item() == pytest.approx(0.0, abs=1e-5)
    assert L.tv_loss(torch.log(p), p).item() == pytest.approx(0.0, abs=1e-5)
    assert L.kl_loss(torch.log(p), p).item() == pytest.approx(0.0, abs=1e-5)


def _reference_alpha(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return torch.minimum(p, torch.softmax(z, -1)).sum(-1)


def _reference_e2e(z: torch.Tensor, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    a = torch.where(mask, _reference_alpha(z, p), 0.0)
    chains = 1 - torch.cumprod(a, 1).mean(1)
    keep = mask.any(1)
    return chains[keep].mean()


@pytest.mark.parametrize("mass", [1.0, 0.8])  # 0.8: p restricted to a draft vocabulary
@pytest.mark.parametrize("name", ["e2e-tv", "tv", "kl", "hybrid"])
def test_gradients_match_float64_autograd_reference(name: str, mass: float) -> None:
    z, p = _rand_dists(7, 3, 40, 3)
    p = p * mass
    mask = torch.ones(7, 3, dtype=torch.bool)
    mask[5, 2] = False
    mask[6, 1:] = False
    z64 = z.double().requires_grad_(True)
    p64 = p.double()
    a = _reference_alpha(z64, p64)
    kl = (p64 * (p64.log() - torch.log_softmax(z64, -1))).sum(-1)
    ref = {
        "e2e-tv": lambda: _reference_e2e(z64, p64, mask),
        "tv": lambda: (1 - a)[mask].mean(),
        "kl": lambda: kl[mask].mean(),
        "hybrid": lambda: (torch.exp(-3 * a.detach()) * kl + (1 - torch.exp(-3 * a.detach())) * (1 - a))[mask].mean(),
    }[name]()
    (g_ref,) = torch.autograd.grad(ref, z64)
    fn = {"e2e-tv": L.e2e_tv_loss, "tv": L.tv_loss, "kl": L.kl_loss, "hybrid": L.hybrid_loss}[name]
    z32 = z.clone().requires_grad_(True)
    out = fn(z32, p, mask)
    out.backward()
    assert out.item() == pytest.approx(ref.item(), abs=1e-5)
    torch.testing.assert_close(z32.grad.double(), g_ref, atol=2e-6, rtol=1e-4)
    assert z32.grad[mask == 0].abs().max() == 0  # masked entries get no gradient


def test_chunking_gives_the_same_alpha_and_gradient() -> None:
    z, p = _rand_dists(9, 2, 33, 4)
    za, zb = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    a_full = L.acceptance_rates(za, p, chunk=1000)
    a_chunk = L.acceptance_rates(zb, p, chunk=2)
    torch.testing.assert_close(a_full, a_chunk)
    (a_full * torch.arange(18.0).view(9, 2)).sum().backward()
    (a_chunk * torch.arange(18.0).view(9, 2)).sum().backward()
    torch.testing.assert_close(za.grad, zb.grad)


def test_zero_acceptance_gives_finite_loss_and_gradient() -> None:
    v = 10
    p = torch.zeros(2, 3, v)
    p[..., :5] = 0.2  # target lives on tokens 0-4
    z = torch.full((2, 3, v), -1e4)
    z[..., 5:] = 0.0  # draft lives on tokens 5-9: alpha underflows to exactly 0
    z.requires_grad_(True)
    alpha = L.acceptance_rates(z, p)
    assert torch.all(alpha == 0)
    for fn in (L.e2e_tv_loss, L.tv_loss, L.hybrid_loss):
        z.grad = None
        loss = fn(z, p)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), fn.__name__
    assert L.e2e_tv_loss(z, p).item() == pytest.approx(1.0)


def test_masking_semantics() -> None:
    z, p = _rand_dists(4, 3, 20, 5)
    alpha = L.acceptance_rates(z, p).detach()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    got = L.e2e_tv_loss(z, p, mask).item()
    # masked positions count as alpha = 0 in their chain; the fully masked chain is left out
    a = alpha * mask
    want = (1 - torch.cumprod(a, 1).mean(1))[:3].mean().item()
    assert got == pytest.approx(want, abs=1e-6)
    # garbage in masked positions changes nothing
    z2, p2 = z.clone(), p.clone()
    z2[~mask] = 1e3
    p2[~mask] = 0.0
    assert L.e2e_tv_loss(z2, p2, mask).item() == pytest.approx(got, abs=1e-6)
    # all masked: 0 and no NaN
    assert L.e2e_tv_loss(z, p, torch.zeros(4, 3, dtype=torch.bool)).item() == 0.0


def test_ce_loss_matches_cross_entropy_and_ignores_masked_ids() -> None:
    z, _ = _rand_dists(3, 2, 15, 6)
    ids = torch.tensor([[1, 2], [3, -1], [4, 5]])
    mask = ids >= 0
    got = L.ce_loss(z, ids, mask).item()
    ref = torch.nn.functional.cross_entropy(z[mask], ids[mask]).item()
    assert got == pytest.approx(ref, abs=1e-5)


def test_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"\[N, g, V\]"):
        L.e2e_tv_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask"):
        L.e2e_tv_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))


def test_feature_loss_is_masked_depth_weighted_smooth_l1_with_gradient_on_the_draft_side_only() -> None:
    gen = torch.Generator().manual_seed(0)
    draft = (torch.randn(5, 3, 8, generator=gen) * 2).requires_grad_(True)
    target = (torch.randn(5, 3, 8, generator=gen) * 2).requires_grad_(True)
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[3:, 2] = False
    weights = torch.tensor([1.0, 0.5, 0.25])
    got = L.feature_loss(draft, target, mask, weights)
    per = torch.nn.functional.smooth_l1_loss(draft, target, reduction="none").mean(-1)
    w = mask * weights
    assert got.item() == pytest.approx(((per * w).sum() / w.sum()).item(), rel=1e-6)
    got.backward()
    assert draft.grad is not None and draft.grad.abs().sum() > 0 and target.grad is None
    assert not draft.grad[3:, 2].any()  # masked positions get no gradient
    assert L.feature_loss(target.detach(), target.detach(), mask).item() == 0.0
    with pytest.raises(ValueError, match=r"two \[N, g, H\] tensors"):
        L.feature_loss(draft[:, :2], target, mask)
