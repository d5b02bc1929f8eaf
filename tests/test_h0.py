"""H0 at one layer against an independent computation through the model's own modules."""

import numpy as np
import pytest
import torch
from conftest import TINY, direct_kl64, make_cached, model_head

from lensspace import fused
from lensspace.adapter import Adapter
from lensspace.experiments.grid import AblationGrid, subspace_basis
from lensspace.experiments.h0 import run_layer
from lensspace.lenses import translate
from lensspace.models import build_random_model
from lensspace.subspaces import ablate, unembedding_bases


@pytest.fixture
def setup(tiny, tmp_path):
    c = make_cached(tiny[0], tmp_path / "cache", seed=2, n_train=6, n_eval=5, seq_len=10)
    return c.adapter, c.lens, c.cache, unembedding_bases(c.adapter)


def _numpy_kl(p_logits, q_logits):
    p = p_logits.double().numpy()
    q = q_logits.double().numpy()
    lp = (
        p
        - np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - p.max(-1, keepdims=True)
    )
    lq = (
        q
        - np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - q.max(-1, keepdims=True)
    )
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_grid_cells_and_independent_value(setup):
    adapter, lens, cache, bases = setup
    grid = AblationGrid(ks=("half", 3), n_boot=100)
    rows = run_layer(adapter, lens, cache, bases, layer=1, grid=grid, chunk=2).rows()
    # output/internal x 2 bases + random, x 2 k x 2 modes x 2 sites
    assert len(rows) == (2 * 2 + 1) * 2 * 2 * 2
    # (OPT-350m: W_U project_out has rank 16 of 32, so the bottom directions are its null space
    # and their ablation's KL is 0 up to float32 rounding, about -1e-8)
    assert all(
        r["kl"] >= -1e-6 and r["kl_lo"] <= r["kl"] + 1e-6 and r["kl"] <= r["kl_hi"] + 1e-6
        for r in rows
    )
    assert {r["n_tokens"] for r in rows} == {5 * 9}

    # independent: the model's own final norm and lm_head on z with the top-16 raw directions
    # removed
    h = cache.load(1, "eval")[:, 1:]
    t = lens.layer_translators[1]
    with torch.no_grad():
        z = h + h @ t.weight.T + t.bias
    w = adapter.unembedding.detach().double().numpy()
    v = np.linalg.svd(w, full_matrices=False)[2].T[:, :16]
    z_abl = z.double().numpy() - (z.double().numpy() @ v) @ v.T
    clean = model_head(adapter, z)
    ablated = model_head(adapter, torch.from_numpy(z_abl).float())
    expected = _numpy_kl(clean, ablated).mean()
    got = next(
        r
        for r in rows
        if (r["subspace"], r["k"], r["basis"], r["mode"], r["site"])
        == ("output", 16, "unembed", "zero", "pre_norm")
    )
    assert got["kl"] == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_removing_everything_leaves_the_norm_bias_prediction(setup):
    adapter, lens, cache, bases = setup
    # zero-ablating all d directions sends z to 0; the head then predicts softmax(W_U b)
    # (uniform for RMSNorm, which has no bias): KL(clean || that) by hand, through the model's
    # own head on z = 0 (the norm of 0 is its bias)
    full = AblationGrid(
        subspaces=("output",),
        ks=(adapter.d_model,),
        bases=("unembed",),
        modes=("zero",),
        sites=("pre_norm", "post_norm"),
        n_boot=50,
    )
    rows = run_layer(adapter, lens, cache, bases, 0, full).rows()
    with torch.no_grad():
        h = cache.load(0, "eval")[:, 1:]
        clean = model_head(adapter, h + lens.layer_translators[0](h))
        floor = model_head(adapter, torch.zeros_like(h))
    expected = _numpy_kl(clean, floor).mean()
    for row in rows:
        assert row["kl"] == pytest.approx(expected, rel=1e-3)


def test_random_control_is_reproducible(setup):
    adapter, lens, cache, bases = setup
    grid = AblationGrid(
        subspaces=("random",), modes=("zero",), sites=("pre_norm",), n_boot=50, seed=3
    )
    first = run_layer(adapter, lens, cache, bases, 2, grid)
    assert first.rows() == run_layer(adapter, lens, cache, bases, 2, grid).rows()
    assert first.per_sequence() == run_layer(adapter, lens, cache, bases, 2, grid).per_sequence()
    # the draws are different subspaces, so their KLs differ
    by_draw = {r["draw"]: r["kl"] for r in first.per_sequence() if r["sequence"] == 0}
    assert len(by_draw) == grid.random_draws and len(set(by_draw.values())) == grid.random_draws


def test_every_cell_equals_the_model_head_on_the_ablated_vector(setup):
    """The linear-head shortcut against the model's own final norm and lm_head, for every cell
    (GPT-2: LayerNorm with a bias; Llama: RMSNorm; Gemma: 1 + w gains and soft-cap; OPT-350m:
    no final norm and project_out)."""
    adapter, lens, cache, bases = setup
    grid = AblationGrid(ks=("half", 3), random_draws=2, n_boot=20)
    results = run_layer(adapter, lens, cache, bases, 1, grid)
    seqs = results.per_sequence()
    z_train = translate(lens, cache.load(1, "train")[:, 1:], 1)
    means = {"pre_norm": z_train.mean((0, 1)), "post_norm": adapter.normalize(z_train).mean((0, 1))}
    with torch.no_grad():
        z = translate(lens, cache.load(1, "eval")[:, 1:], 1)
        clean = model_head(adapter, z)
        for cell in grid.variants(adapter.d_model):
            q = subspace_basis(bases, grid, 1, cell.subspace, cell.k, cell.basis, cell.draw)
            if cell.site == "pre_norm":
                ablated = model_head(adapter, ablate(z, q, cell.mode, means["pre_norm"]))
            else:  # the norm's scale frozen: ablate the normalised vector, then gain, bias, head
                ablated = model_head(
                    adapter,
                    adapter.norm_affine(
                        ablate(adapter.normalize(z), q, cell.mode, means["post_norm"])
                    ),
                    after_norm=True,
                )
            expected = _numpy_kl(clean, ablated).mean(-1)
            got = [r["kl"] for r in seqs if all(r[f] == getattr(cell, f) for f in cell._fields)]
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("fused_cpu", [True, False])
@pytest.mark.parametrize(
    ("family", "gain", "bias"), [("llama", 30.0, None), ("gpt2", 1.0, 60.0), ("gpt2", 30.0, 60.0)]
)
def test_fast_path_keeps_float32_precision_where_logits_are_large(
    family, gain, bias, fused_cpu, tmp_path, monkeypatch
):
    """A final norm gain of 30 (logits in the hundreds) or a LayerNorm bias of 60 (a large
    constant part in every logit): each sequence's KL, from about 1e-17 to 90 nats, still
    matches the float64 definition to a relative 2e-4 (measured: 3.5e-5), and none is
    negative. (An assembly that subtracts logit-sized float32 terms gives errors of 1e-5
    absolute here: negative means, relative errors of 1000 on the smallest KLs.)"""
    monkeypatch.setattr(
        fused.change_sums, "enabled", fused_cpu
    )  # the compiled kernel, or the eager passes
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)  # also on this small vocabulary
    model, _ = build_random_model(TINY[family])
    model.requires_grad_(False)
    adapter = Adapter(model)
    with torch.no_grad():
        adapter.final_norm.weight.mul_(gain)
        if bias is not None:
            adapter.final_norm.bias.fill_(bias)
    c = make_cached(adapter, tmp_path / "cache", seed=2, n_train=6, n_eval=5, seq_len=10)
    bases = unembedding_bases(adapter)
    grid = AblationGrid(ks=("half", 3, 1), random_draws=2, n_boot=20)
    for layer in range(3):
        results = run_layer(adapter, c.lens, c.cache, bases, layer, grid)
        z_train = translate(c.lens, c.cache.load(layer, "train")[:, 1:], layer)
        means = {
            "pre_norm": z_train.mean((0, 1)),
            "post_norm": adapter.normalize(z_train).mean((0, 1)),
        }
        z = translate(c.lens, c.cache.load(layer, "eval")[:, 1:], layer)
        for cell in grid.variants(adapter.d_model):
            q = subspace_basis(bases, grid, layer, cell.subspace, cell.k, cell.basis, cell.draw)
            expected = direct_kl64(adapter, z, q, cell.mode, cell.site, means[cell.site]).mean(-1)
            fast = torch.cat(results.kl[cell])
            assert fast.min() >= 0
            torch.testing.assert_close(fast.mean(-1), expected, rtol=2e-4, atol=1e-10)
