"""H1: the exact lens pull-back and residual ablations (circuit ends: tests/test_circuits.py)."""

import pytest
import torch
from conftest import make_cached

from lensspace.experiments.grid import AblationGrid, Cell
from lensspace.experiments.h1 import cell_edit, run_layers
from lensspace.lenses import translate
from lensspace.runner import BlockRunner
from lensspace.subspaces import LensPullback, ablate, random_subspace, select, unembedding_bases

D = 12


def _affine(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(D, D, generator=gen) * 0.3, torch.randn(D, generator=gen) * 3


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_pullback_is_the_lens_space_ablation(mode):
    a, b = _affine()
    q = random_subspace(D, 4, seed=1)
    h = torch.randn(50, D, generator=torch.Generator().manual_seed(2)).double()
    z = h @ (torch.eye(D, dtype=torch.float64) + a.double()).T + b.double()
    z_mean = z.mean(0) + 1.0
    edited = LensPullback(a, b, q).apply(h, mode, z_mean)
    z_edited = edited @ (torch.eye(D, dtype=torch.float64) + a.double()).T + b.double()
    torch.testing.assert_close(z_edited, ablate(z, q.double(), mode, z_mean), atol=1e-9, rtol=0)


@pytest.mark.parametrize("layer", [3, 12, 24])
@pytest.mark.parametrize("subspace", ["output", "internal"])
def test_pullback_on_the_real_lens_gives_the_ablated_lens_vector(real, layer, subspace):
    """T_i(h') = ablate(T_i(h)) with the real lens: large biases, ill-conditioned translators.
    The old orthonormal pull-back left Q^T z = Q^T b (larger than before at some layers)."""
    translator = real.lens.layer_translators[layer]
    q = select(
        unembedding_bases(real.adapter)["unembed"].vectors, subspace, real.adapter.d_model // 2
    )
    h = real.cache.load(layer, "eval")[:2, 1:]
    pulled = LensPullback(translator.weight.detach(), translator.bias.detach(), q)
    z = h.double() @ pulled.m.T + pulled.b  # T_i(h) in float64
    with torch.no_grad():
        z_mean = (
            translate(real.lens, real.cache.load(layer, "train")[:, 1:], layer)
            .double()
            .mean((0, 1))
        )
    for mode in ("zero", "mean"):
        edited = pulled.apply(h.double(), mode, z_mean)
        z_edited = edited @ pulled.m.T + pulled.b
        expected = ablate(z, q.double(), mode, z_mean)
        scale = z.norm(dim=-1, keepdim=True)
        assert float(((z_edited - expected).norm(dim=-1, keepdim=True) / scale).max()) < 1e-8
        # the ablated coordinates are gone (zero) or at their mean, the others untouched
        coords = z_edited @ q.double()
        target = (
            torch.zeros_like(coords) if mode == "zero" else (z_mean @ q.double()).expand_as(coords)
        )
        assert float((coords - target).abs().max()) < 1e-6 * float(scale.max())
    # in float32, as the experiment feeds the blocks, the identity holds to float tolerance
    edited32 = pulled.apply(h, "zero")
    with torch.no_grad():
        z32 = translate(real.lens, edited32, layer).double()
    assert float(((z32 - ablate(z, q.double(), "zero")).norm(dim=-1) / z.norm(dim=-1)).max()) < 1e-3


@pytest.fixture
def cached(tiny, tmp_path):
    c = make_cached(tiny[0], tmp_path / "cache", seed=3, n_train=4, n_eval=4, seq_len=10)
    return c.adapter, c.lens, c.cache, unembedding_bases(c.adapter), c.tokens


def test_grid_has_a_random_control_per_operation():
    grid = AblationGrid(
        bases=("unembed", "lens_pullback"), modes=("zero",), sites=("residual",), random_draws=3
    )
    cells = grid.variants(8)
    assert {c.basis for c in cells if c.subspace == "random"} == {"random", "random_lens_pullback"}
    assert len([c for c in cells if c.subspace == "random"]) == 2 * 3


@pytest.mark.parametrize("job", [(1,), (0, 1, 2)])
def test_residual_ablation_against_hooked_full_forward(cached, job):
    """Layer 1 alone, and inside a job whose layers resume from layer 0's cached residual (the
    start at layer 1 is then the one the model computes, and one clean pass is every layer's
    reference): each equals the model's full forward from the tokens with the edit hooked in
    before block 1 (up to the cache's float16 storage of the first residual)."""
    adapter, lens, cache, bases, tokens = cached
    runner = BlockRunner(adapter)
    grid = AblationGrid(
        subspaces=("output", "internal", "random"),
        ks=("half",),
        bases=("unembed", "lens_pullback"),
        modes=("zero", "mean"),
        sites=("residual",),
        n_boot=50,
        random_draws=2,
        experiment="h1",
    )
    by_layer = run_layers(runner, lens, cache, bases, job, grid=grid, chunk=3)
    assert sorted(by_layer) == list(job)
    results = by_layer[1]
    rows = results.rows()
    assert len(rows) == (2 * 2 + 2) * 2
    assert all(r["kl"] >= 0 and r["site"] == "residual" and r["n_tokens"] == 4 * 9 for r in rows)
    ids = tokens["eval"].long()
    h_train = cache.load(1, "train")[:, 1:]
    z_mean = translate(lens, h_train, 1).double().mean((0, 1))
    clean = adapter.model(ids).logits[:, 1:].log_softmax(-1)
    for cell in (
        Cell("output", adapter.d_model // 2, "lens_pullback", "mean", "residual"),
        Cell("random", adapter.d_model // 2, "random_lens_pullback", "zero", "residual", 1),
        Cell("internal", adapter.d_model // 2, "unembed", "mean", "residual"),
    ):
        edit = cell_edit(cell, bases, lens, 1, grid, h_train.mean((0, 1)), z_mean)

        def hook(_m, args, kwargs, edit=edit):
            h = args[0].clone()
            h[:, 1:] = edit(h[:, 1:])
            return (h, *args[1:]), kwargs

        handle = adapter.blocks[1].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            ablated = adapter.model(ids).logits[:, 1:].log_softmax(-1)
        finally:
            handle.remove()
        expected = (clean.exp() * (clean - ablated)).sum(-1).mean(-1)
        got = [
            r["kl"]
            for r in results.per_sequence()
            if all(r[f] == getattr(cell, f) for f in cell._fields)
        ]
        torch.testing.assert_close(
            torch.tensor(got, dtype=torch.float64), expected.double(), rtol=1e-3, atol=1e-6
        )
    # the edit's size is reported beside its KL
    assert all(r["edit_rel"] > 0 for r in rows)
