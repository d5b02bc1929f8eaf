"""The math of projections, subspaces, KL, bootstrap and least squares, against independent code."""

import numpy as np
import pytest
import torch

from lensspace.divergences import kl_from_logits, kl_from_logprobs
from lensspace.errors import LensspaceError
from lensspace.lenses import fit_affine
from lensspace.stats import bootstrap_mean
from lensspace.subspaces import ablate, project, random_subspace, select, unembedding_bases

D = 16


def _orthonormal(seed=0):
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))
    return q


@pytest.mark.parametrize("subspace", ["output", "internal", "random"])
@pytest.mark.parametrize("k", [1, 5, D])
def test_projection_is_idempotent_and_removes_k_dims(subspace, k):
    q = select(_orthonormal(), subspace, k, seed=1)
    assert q.shape == (D, k)
    torch.testing.assert_close(q.T @ q, torch.eye(k), atol=1e-5, rtol=0)
    x = torch.randn(100, D, generator=torch.Generator().manual_seed(2))
    p = project(x, q)
    torch.testing.assert_close(project(p, q), p, atol=1e-5, rtol=0)
    removed = ablate(x, q, "zero")
    assert torch.linalg.matrix_rank(removed, atol=1e-4) == D - k
    torch.testing.assert_close(removed @ q, torch.zeros(100, k), atol=1e-5, rtol=0)


def test_output_and_internal_split_the_space():
    basis = _orthonormal()
    out, internal = select(basis, "output", D // 2), select(basis, "internal", D // 2)
    torch.testing.assert_close(out @ out.T + internal @ internal.T, torch.eye(D), atol=1e-5, rtol=0)


def test_mean_ablation_sets_component_to_mean():
    q = select(_orthonormal(), "output", 4)
    x, mean = torch.randn(50, D), torch.randn(D)
    out = ablate(x, q, "mean", mean)
    torch.testing.assert_close(out @ q, (mean @ q).expand(50, 4), atol=1e-5, rtol=0)
    # the orthogonal complement is untouched
    torch.testing.assert_close(out - project(out, q), x - project(x, q), atol=1e-5, rtol=0)


def test_random_subspace_is_seeded():
    a, b, c = random_subspace(D, 4, 7), random_subspace(D, 4, 7), random_subspace(D, 4, 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_bad_k_and_names_are_refused():
    with pytest.raises(LensspaceError, match="k=17"):
        select(_orthonormal(), "output", D + 1)
    with pytest.raises(LensspaceError, match="zero or mean"):
        ablate(torch.randn(2, D), _orthonormal()[:, :2], "median")


def test_kl_matches_independent_numpy():
    gen = torch.Generator().manual_seed(3)
    p, q = torch.randn(20, 50, generator=gen) * 3, torch.randn(20, 50, generator=gen) * 3
    pn, qn = p.double().numpy(), q.double().numpy()
    sp = np.exp(pn - pn.max(1, keepdims=True))
    sp /= sp.sum(1, keepdims=True)
    sq = np.exp(qn - qn.max(1, keepdims=True))
    sq /= sq.sum(1, keepdims=True)
    expected = (sp * np.log(sp / sq)).sum(1)
    np.testing.assert_allclose(kl_from_logits(p, q).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert (kl_from_logits(p, q) >= 0).all()
    torch.testing.assert_close(kl_from_logits(p, p), torch.zeros(20), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        kl_from_logprobs(p.log_softmax(-1), p.log_softmax(-1)), torch.zeros(20), atol=1e-6, rtol=0
    )


def test_bootstrap_interval():
    values = torch.rand(30, 10, generator=torch.Generator().manual_seed(4))
    est = bootstrap_mean(values, n_boot=500, seed=1)
    assert est == bootstrap_mean(values, n_boot=500, seed=1)
    assert est.lo < est.mean < est.hi
    assert est.n_tokens == 300
    assert est.mean == pytest.approx(float(values.double().mean()))
    constant = bootstrap_mean(torch.full((8, 5), 2.5), n_boot=100)
    assert constant.lo == constant.mean == constant.hi == 2.5


def test_least_squares_recovers_planted_affine_map():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(D, D, generator=gen) * 0.3, torch.randn(D, generator=gen)
    h = torch.randn(2000, D, generator=gen)
    target = h + h @ a.T + b
    a_hat, b_hat = fit_affine(h, target, ridge=1e-9)
    torch.testing.assert_close(a_hat, a, atol=1e-4, rtol=0)
    torch.testing.assert_close(b_hat, b, atol=1e-4, rtol=0)


def test_unembedding_bases(tiny):
    adapter, _ = tiny
    bases = unembedding_bases(adapter)
    w = adapter.unembedding.double()
    for name, matrix in (
        ("unembed", w),
        ("unembed_centered", (w - w.mean(0)) * adapter.norm_gain.double()),
    ):
        basis = bases[name]
        v = basis.vectors.double()
        torch.testing.assert_close(
            v.T @ v, torch.eye(adapter.d_model, dtype=torch.float64), atol=1e-5, rtol=0
        )
        assert (basis.singular_values[:-1] >= basis.singular_values[1:]).all()
        # ||W v_i|| = s_i: the columns are right singular vectors in order
        torch.testing.assert_close(
            (matrix @ v).norm(dim=0).float(), basis.singular_values, rtol=1e-4, atol=1e-4
        )
    # the centred matrix sends the all-ones vocabulary direction to zero
    ones = torch.ones(1, w.shape[0], dtype=torch.float64)
    centered = (w - w.mean(0)) * adapter.norm_gain.double()
    assert (ones @ centered).abs().max() < 1e-8
