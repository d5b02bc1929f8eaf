"""H0 on the real default model: the linear-head shortcut equals the direct ablation, and the
norm-share diagnostic adds up. Real regime: large lens biases, large constant components."""

import pytest
import torch
from conftest import direct_kl64

from lensspace import fused
from lensspace.experiments.grid import AblationGrid, relative_edit, subspace_basis
from lensspace.experiments.h0 import norm_shares, run_layer
from lensspace.head import LinearHead
from lensspace.lenses import translate
from lensspace.subspaces import ablate, unembedding_bases

GRID = AblationGrid(ks=("half",), random_draws=2, n_boot=50)
# k = 100: the halves are not complements, so each has its own product
UNPAIRED = AblationGrid(
    subspaces=("output", "internal"), ks=(100,), bases=("unembed_centered",), n_boot=50
)
# k = 1: the smallest edits and KLs, where float32 rounding shows most
SMALLEST = AblationGrid(ks=(1,), random_draws=2, n_boot=50)
# against float64, about 10x the largest errors measured here: per sequence (what the
# statistics read) and per token (the float32 direct path misses the latter by 100x)
SEQ_RTOL, SEQ_ATOL = 2e-5, 1e-7
TOKEN_RTOL, TOKEN_ATOL = 2e-4, 1e-6
# The float64 references, per (layer, grid, cell): the same cells are checked with the compiled
# kernel and with the eager passes, and the reference depends on neither.
REFERENCE_KLS: dict = {}


@pytest.mark.parametrize(
    ("layer", "grid", "fused_cpu"),
    [
        (3, GRID, True),
        (24, GRID, True),
        (24, UNPAIRED, True),
        (24, SMALLEST, True),
        (24, GRID, False),
        (24, SMALLEST, False),
    ],
)
def test_fast_path_equals_direct_ablation_cell_by_cell(real, layer, grid, fused_cpu, monkeypatch):
    """run_layer (products shared by modes, sites and complementary halves; KL from the logits'
    change) against the definition in float64 (ablate z, then norm, gain and unembedding, then
    log-softmax), every cell, sequence and token, to float32's precision: the fast path
    subtracts no two logit-sized terms (SmolLM2's logits reach about 90), so its errors stay
    relative to each KL. (Measured: per sequence within 1.6e-6 relative plus 1e-7, per token
    within 2.3e-5 relative plus 1e-6; an assembly that subtracts logit-sized terms needs 7e-4
    and 3e3, and gives negative token KLs.)"""
    monkeypatch.setattr(
        fused.change_sums, "enabled", fused_cpu
    )  # the compiled kernel, or the eager passes
    adapter, bases = real.adapter, unembedding_bases(real.adapter)
    results = run_layer(adapter, real.lens, real.cache, bases, layer, grid)
    z_train = translate(real.lens, real.cache.load(layer, "train")[:, 1:], layer)
    means = {"pre_norm": z_train.mean((0, 1)), "post_norm": adapter.normalize(z_train).mean((0, 1))}
    z = translate(real.lens, real.cache.load(layer, "eval")[:, 1:], layer).float()
    u = adapter.normalize(z)
    for cell in grid.variants(adapter.d_model):
        q = subspace_basis(bases, grid, layer, cell.subspace, cell.k, cell.basis, cell.draw)
        key = (layer, grid, cell)
        if key not in REFERENCE_KLS:
            REFERENCE_KLS[key] = direct_kl64(adapter, z, q, cell.mode, cell.site, means[cell.site])
        expected = REFERENCE_KLS[key]
        fast = torch.cat(results.kl[cell])
        assert fast.min() >= 0
        torch.testing.assert_close(fast.mean(-1), expected.mean(-1), rtol=SEQ_RTOL, atol=SEQ_ATOL)
        torch.testing.assert_close(fast, expected, rtol=TOKEN_RTOL, atol=TOKEN_ATOL)
        x = z if cell.site == "pre_norm" else u
        edit = torch.cat(results.edit[cell])
        torch.testing.assert_close(
            edit, relative_edit(x, ablate(x, q, cell.mode, means[cell.site])), rtol=1e-4, atol=1e-6
        )


def test_linear_head_clean_logits_are_the_model_head(real):
    z = translate(real.lens, real.cache.load(12, "eval")[:2, 1:], 12).float()
    with torch.no_grad():
        logits, _ = LinearHead(real.adapter).clean(z)
        torch.testing.assert_close(logits, real.adapter.logits(z), rtol=1e-4, atol=1e-3)


def test_run_layer_rows_and_sequences_agree(real):
    grid = AblationGrid(bases=("unembed",), modes=("mean",), random_draws=2, n_boot=200)
    results = run_layer(
        real.adapter, real.lens, real.cache, unembedding_bases(real.adapter), 12, grid
    )
    rows, seqs = results.rows(), results.per_sequence()
    n_seq = len(real.tokens["eval"])
    random_rows = [r for r in rows if r["subspace"] == "random"]
    assert random_rows and all(
        r["n_draws"] == 2 and r["draw_min"] <= r["kl"] <= r["draw_max"] for r in random_rows
    )
    for row in rows:
        mine = [
            s["kl"]
            for s in seqs
            if all(s[c] == row[c] for c in ("subspace", "k", "basis", "mode", "site"))
        ]
        assert len(mine) == n_seq * row["n_draws"]
        assert row["kl"] == pytest.approx(sum(mine) / len(mine), rel=1e-9)
        assert row["kl_lo"] <= row["kl"] <= row["kl_hi"]


def test_random_draws_differ_across_layers_experiments_and_draws():
    seeds = {
        AblationGrid(experiment=e).random_seed(layer, 288, "random", d)
        for e in ("h0", "h1")
        for layer in (0, 3)
        for d in range(4)
    }
    assert len(seeds) == 16


def test_norm_shares_add_up_and_show_the_constant_part(real):
    rows = norm_shares(
        real.adapter,
        real.lens,
        real.cache,
        unembedding_bases(real.adapter),
        12,
        AblationGrid(ks=("half",)),
    )
    for site in ("pre_norm", "post_norm"):
        for basis in ("unembed", "unembed_centered"):
            pair = [r for r in rows if r["site"] == site and r["basis"] == basis]
            # the halves are complementary: their shares add to the whole squared norm
            assert sum(r["share"] for r in pair) == pytest.approx(1.0, abs=1e-6)
            for r in pair:
                assert r["share"] == pytest.approx(
                    r["constant_share"] + r["varying_share"], rel=1e-9
                )
    # on the real model the lens vectors carry a large constant component (|Q^T mean| of
    # hundreds against a token-varying RMS of the same size)
    raw = [r for r in rows if r["site"] == "pre_norm" and r["basis"] == "unembed"]
    assert max(r["constant_share"] for r in raw) > 0.2
