"""H2 embedding lenses and layer-shuffle invariance against independent computations."""

import pandas as pd
import pytest
import torch
from conftest import make_cached, model_head

from lensspace.activations import ActivationCache, write_cache
from lensspace.divergences import kl_from_logprobs
from lensspace.errors import LensspaceError
from lensspace.experiments.grid import AblationGrid, subspace_basis
from lensspace.experiments.h2 import (
    EmbeddingLensSettings,
    embedding_basis,
    evaluate_layers,
    fit_embedding_lenses,
    r_squared,
)
from lensspace.experiments.shuffle import (
    LensSpaceBlocks,
    Permutation,
    measure,
    swap,
    translator_dominated,
    window_permutations,
)
from lensspace.lenses import LensTraining, empty_lens
from lensspace.runner import BlockRunner
from lensspace.settings import ridge_lens_params, second_ridge
from lensspace.subspaces import ablate


@pytest.fixture
def cached(tiny, tmp_path):
    c = make_cached(
        tiny[0], tmp_path / "cache", seed=5, n_train=8, n_eval=4, seq_len=12, scale=0.05
    )
    return BlockRunner(c.adapter), c.lens, c.cache


def test_swap_and_window_orders():
    assert swap(5, 1, 3).order == (3, 2, 1, 4)
    assert swap(5, 1, 3).start == 1
    perms = window_permutations(6, 3, 4, seed=0)
    assert perms == window_permutations(6, 3, 4, seed=0)
    for p in perms:
        assert sorted(p.order) == list(range(p.start, 6)) and p.j - p.i == 2


@pytest.mark.parametrize("fused_cpu", [True, False])
def test_identity_order_gives_zero_kl_and_full_agreement(cached, fused_cpu, monkeypatch):
    """The identity order reproduces the reference logits bit for bit: natively its KL is exactly 0
    with the compiled KL (the same loops on both sides), under 1e-6 eagerly."""
    from lensspace import fused

    monkeypatch.setattr(fused.kl_terms, "enabled", fused_cpu)
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)  # also on the tiny vocabulary
    runner, lens, cache = cached
    n = runner.adapter.n_layers
    identity = Permutation(tuple(range(n)), 0, 0, 0)
    lens_spaces = {
        "lens": LensSpaceBlocks(runner, lens, 1e-3),
        "lens_ridge": LensSpaceBlocks(runner, empty_lens(runner.adapter, "identity"), 10.0),
    }
    rows = measure(runner, cache, [identity], lens_spaces, n_boot=20, seed=0)
    assert [r["space"] for r in rows] == ["native", "lens", "lens_ridge"]
    for row in rows:
        assert row["kl"] == pytest.approx(0, abs=1e-6) and row["top1_agreement"] == 1.0
    if fused_cpu:
        assert rows[0]["kl"] == 0.0
    # the first block is the start's own: the wrapper gives it exactly h
    assert [r["distortion"] for r in rows[1:]] == [pytest.approx(0, abs=1e-12)] * 2
    assert rows[0]["distortion"] is None and rows[0]["ridge"] is None
    assert [r["ridge"] for r in rows[1:]] == [1e-3, 10.0]


def test_swaps_change_the_output(cached):
    runner, lens, cache = cached
    rows = measure(
        runner,
        cache,
        [swap(runner.adapter.n_layers, 0, 2)],
        {"lens": LensSpaceBlocks(runner, lens)},
        n_boot=20,
        seed=0,
    )
    assert {r["space"] for r in rows} == {"native", "lens"}
    assert all(r["kl"] > 0 and 0 <= r["top1_agreement"] <= 1 for r in rows)


def test_swap_costs_against_full_passes_from_the_earliest_start(cached):
    """Each order resumes from the residual the model itself computes from the earliest cached
    start, and is compared with the unpermuted model's output from there."""
    runner, lens, cache = cached
    n = runner.adapter.n_layers
    perms = [swap(n, 1, 2), swap(n, 0, 2)]
    rows = measure(
        runner, cache, perms, {"lens": LensSpaceBlocks(runner, lens)}, n_boot=20, seed=0, chunk=3
    )
    h0 = cache.load(0, "eval")
    with torch.no_grad():

        def through(order):
            h = h0
            for block in order:
                h = runner.call_block(block, h)
            return runner.adapter.logits(h)[:, 1:].double().log_softmax(-1)

        clean = through(range(n))
        for perm in perms:
            permuted = through([*range(perm.start), *perm.order])
            kl = (clean.exp() * (clean - permuted)).sum(-1)
            row = next(
                r for r in rows if r["space"] == "native" and (r["i"], r["j"]) == (perm.i, perm.j)
            )
            assert row["kl"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7)
            assert row["top1_agreement"] == pytest.approx(
                float((clean.argmax(-1) == permuted.argmax(-1)).double().mean())
            )
    assert all(r["kl"] > 0 for r in rows)


def test_identity_lenses_make_lens_space_equal_native(cached):
    runner, _, cache = cached
    identity_lens = empty_lens(runner.adapter, "identity")
    blocks = LensSpaceBlocks(runner, identity_lens)
    h = cache.load(1, "eval")
    perm = swap(runner.adapter.n_layers, 1, 2)
    torch.testing.assert_close(blocks.run(h, perm), runner.run(h, 1, perm.order))


def test_translator_inverse_round_trip(cached):
    runner, lens, cache = cached
    blocks = LensSpaceBlocks(runner, lens)
    h = cache.load(1, "eval")
    for layer in range(runner.adapter.n_layers):
        torch.testing.assert_close(
            blocks.from_lens(blocks.to_lens(h, layer), layer), h, atol=1e-4, rtol=1e-5
        )
    assert all(c >= 1 for c in blocks.conditions)


def test_singular_translator_is_refused(cached):
    runner, lens, _ = cached
    with torch.no_grad():
        lens.layer_translators[1].weight.copy_(-torch.eye(runner.adapter.d_model))
    with pytest.raises(LensspaceError, match="translator 1 is not safely invertible"):
        LensSpaceBlocks(runner, lens)


def test_position_zero_runs_natively_in_lens_space(cached):
    """Position 0 attends only to itself: passed untranslated, it is the native permuted run's."""
    runner, lens, cache = cached
    h = cache.load(0, "eval")
    perm = swap(runner.adapter.n_layers, 0, 2)
    lens_run = LensSpaceBlocks(runner, lens).run(h, perm)
    torch.testing.assert_close(
        lens_run[:, 0], runner.run(h, 0, perm.order)[:, 0], rtol=1e-5, atol=1e-5
    )


def test_distortion_is_the_first_blocks_input_change(cached):
    runner, lens, cache = cached
    h = cache.load(0, "eval")
    perm = swap(runner.adapter.n_layers, 0, 2)
    blocks = LensSpaceBlocks(runner, lens)
    t0, t2 = lens.layer_translators[0], lens.layer_translators[2]
    eye = torch.eye(runner.adapter.d_model, dtype=torch.float64)
    (m0, b0), (m2, b2) = [
        (eye + t.weight.detach().double(), t.bias.detach().double()) for t in (t0, t2)
    ]
    x = h[:, 1:].double()
    moved = torch.linalg.solve(m2, (x @ m0.T + b0 - b2).unsqueeze(-1)).squeeze(-1)  # T_2^-1(T_0(h))
    expected = (moved - x).norm(dim=-1) / x.norm(dim=-1)
    torch.testing.assert_close(blocks.distortion(h, perm), expected)
    assert float(expected.mean()) > 0.01


def test_second_ridge_switches():
    on = {"spaces": ["native", "lens", "lens_ridge"], "second_ridge": 10}
    assert second_ridge(on) == 10.0
    assert LensTraining(**ridge_lens_params(on, seed=3)) == LensTraining(
        ridge=10.0, refine_steps=0, seed=3
    )
    for off in ({**on, "second_ridge": None}, {**on, "spaces": ["native", "lens"]}):
        assert second_ridge(off) is None and ridge_lens_params(off, seed=3) is None


def _swap_rows(lens_kl: float, distortion: float) -> pd.DataFrame:
    rows = []
    for i in range(4):
        rows.append(
            {
                "i": i,
                "j": i + 1,
                "space": "native",
                "kl": 0.2,
                "top1_agreement": 0.8,
                "distortion": None,
                "ridge": None,
                "kind": "swap",
            }
        )
        rows.append(
            {
                "i": i,
                "j": i + 1,
                "space": "lens",
                "kl": lens_kl,
                "top1_agreement": 0.01,
                "distortion": distortion,
                "ridge": 0.001,
                "kind": "swap",
            }
        )
    rows.append(
        {
            "i": 0,
            "j": 3,
            "space": "lens",
            "kl": 0.0,
            "top1_agreement": 1.0,
            "distortion": 0.0,
            "ridge": 0.001,
            "kind": "window",
        }
    )
    return pd.DataFrame(rows)


def test_translator_dominated_statement():
    statement = translator_dominated(_swap_rows(lens_kl=20.0, distortion=7.0))
    assert statement is not None and "measure the translators" in statement
    assert "20 nats (native 0.2" in statement and "7 times its own norm" in statement
    assert "the lens space (lens ridge 0.001)" in statement
    assert translator_dominated(_swap_rows(lens_kl=20.0, distortion=0.5)) is None
    assert translator_dominated(_swap_rows(lens_kl=0.3, distortion=7.0)) is None


def test_least_squares_embedding_lens_recovers_planted_map(tiny):
    adapter, _ = tiny
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(500, adapter.d_model, generator=gen)
    b, c = (
        torch.randn(adapter.d_model, adapter.d_model, generator=gen) * 0.2,
        torch.randn(adapter.d_model, generator=gen),
    )
    h = e + e @ b.T + c
    from lensspace.lenses import fit_affine

    b_hat, c_hat = fit_affine(e, h, ridge=1e-10)
    torch.testing.assert_close(b_hat, b, atol=1e-4, rtol=0)
    assert r_squared(e + e @ b_hat.T + c_hat, h) == pytest.approx(1.0, abs=1e-8)


def test_r_squared_is_one_at_layer_zero_and_embedding_route_runs(cached):
    runner, lens, cache = cached
    # layer 0: h_0 is exactly the embedding, an affine function of itself
    emb0 = fit_embedding_lenses(runner, lens, cache, [0], EmbeddingLensSettings(refine_steps=0))[0]
    grid = AblationGrid(
        subspaces=("output", "internal", "random"),
        ks=("half",),
        bases=("embed",),
        modes=("zero",),
        sites=("embedding",),
        n_boot=20,
    )
    fit0, _ = evaluate_layers(
        runner, lens, cache, {0: emb0}, embedding_basis(runner.adapter), grid
    )[0]
    assert fit0["r2"] == pytest.approx(1.0, abs=1e-4)
    for objective in ("lens", "downstream"):
        emb = fit_embedding_lenses(
            runner,
            lens,
            cache,
            [2],
            EmbeddingLensSettings(objective=objective, refine_steps=2, refine_sequences=2),
        )[2]
        fit, results = evaluate_layers(
            runner, lens, cache, {2: emb}, embedding_basis(runner.adapter), grid
        )[2]
        rows = results.rows()
        assert fit["r2"] <= 1 and fit["kl_lens_route"] >= 0 and fit["kl_downstream_route"] >= 0
        assert len(rows) == 3 and all(r["kl"] >= 0 and r["site"] == "embedding" for r in rows)


def test_every_embedding_cell_equals_the_model_head_on_the_mapped_ablated_input(cached):
    """The cells' shortcut (coefficients carried through the linear part of T_i E_i, KL from
    the head's linearity) against the definition through the model's own final norm and
    lm_head: ablate e, apply E_i and T_i, run the head (GPT-2: LayerNorm with a bias; Llama:
    RMSNorm; Gemma: 1 + w gains and soft-cap; OPT-350m: no final norm and project_out)."""
    runner, lens, cache = cached
    adapter = runner.adapter
    grid = AblationGrid(
        ks=("half", 3),
        bases=("embed",),
        modes=("zero", "mean"),
        sites=("embedding",),
        random_draws=2,
        n_boot=20,
        experiment="h2",
    )
    emb_lenses = fit_embedding_lenses(
        runner, lens, cache, [1, 2], EmbeddingLensSettings(refine_steps=1, refine_sequences=2)
    )
    basis = embedding_basis(adapter)
    evaluated = evaluate_layers(runner, lens, cache, emb_lenses, basis, grid, chunk=3)
    e = cache.load(0, "eval")[:, 1:]
    mean = cache.load(0, "train")[:, 1:].mean((0, 1))
    for layer, emb in emb_lenses.items():
        with torch.no_grad():
            clean = model_head(adapter, lens.transform_hidden(emb(e), layer))
            for cell in grid.variants(adapter.d_model):
                q = subspace_basis(
                    {"embed": basis}, grid, layer, cell.subspace, cell.k, cell.basis, cell.draw
                )
                ablated = model_head(
                    adapter, lens.transform_hidden(emb(ablate(e, q, cell.mode, mean)), layer)
                )
                expected = kl_from_logprobs(
                    clean.double().log_softmax(-1), ablated.double().log_softmax(-1)
                )
                got = torch.cat(evaluated[layer][1].kl[cell])
                torch.testing.assert_close(got.mean(-1), expected.mean(-1), rtol=1e-3, atol=1e-6)


def test_embedding_lenses_fitted_together_equal_each_fitted_alone(cached):
    """A job refines its layers step by step together, sharing each step's target: every
    layer's lens is exactly the one fitted alone (same batches, same target, same updates)."""
    runner, lens, cache = cached
    settings = EmbeddingLensSettings(refine_steps=3, refine_sequences=2)
    together = fit_embedding_lenses(runner, lens, cache, [1, 2], settings)
    for layer in (1, 2):
        alone = fit_embedding_lenses(runner, lens, cache, [layer], settings)[layer]
        for mine, theirs in zip(together[layer].parameters(), alone.parameters()):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_r_squared_is_one_where_the_residual_is_affine_in_the_embedding(tmp_path):
    """Silence block 0 (its attention and MLP write nothing): h_1 = h_0 = the embedding."""
    from lensspace.adapter import Adapter
    from lensspace.models import build_random_model

    model, _ = build_random_model(
        {"arch": "llama", "n_layers": 2, "d_model": 16, "n_heads": 2, "seed": 9}
    )
    adapter = Adapter(model.requires_grad_(False))
    with torch.no_grad():
        adapter.attention_out(0).weight.zero_()
        adapter.blocks[0].mlp.down_proj.weight.zero_()
    gen = torch.Generator().manual_seed(1)
    tokens = {
        "train": torch.randint(0, 256, (6, 10), generator=gen, dtype=torch.int32),
        "eval": torch.randint(0, 256, (3, 10), generator=gen, dtype=torch.int32),
    }
    write_cache(adapter, tokens, tmp_path / "c", {}, storage="float32")
    cache = ActivationCache(tmp_path / "c")
    runner, lens = BlockRunner(adapter), empty_lens(adapter, "z")
    emb = fit_embedding_lenses(
        runner, lens, cache, [1], EmbeddingLensSettings(refine_steps=0, ridge=1e-9)
    )[1]
    grid = AblationGrid(
        subspaces=("output",),
        ks=(4,),
        bases=("embed",),
        modes=("zero",),
        sites=("embedding",),
        n_boot=20,
    )
    fit, _ = evaluate_layers(runner, lens, cache, {1: emb}, embedding_basis(adapter), grid)[1]
    assert fit["r2"] == pytest.approx(1.0, abs=1e-6)
    assert fit["kl_downstream_route"] == pytest.approx(0.0, abs=1e-5)
