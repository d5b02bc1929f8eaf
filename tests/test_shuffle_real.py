"""Lens-space layer shuffle on the real default model (SmolLM2-135M): the regime where
position 0 is an attention sink and the translators are ill-conditioned, which tiny random
models do not reach."""

import pandas as pd
import pytest
import torch

from lensspace.experiments.shuffle import (
    LensSpaceBlocks,
    Permutation,
    measure,
    swap,
    translator_dominated,
)
from lensspace.lenses import empty_lens, fit_affine
from lensspace.runner import BlockRunner

RUN_RIDGE = 1e-3  # the real fixture's lens: least squares at the run's default ridge
SECOND_RIDGE = 10.0
PAIRS = (3, 12, 20)  # adjacent swaps (i, i + 1): early, middle and late blocks


@pytest.fixture(scope="module")
def runner(real):
    return BlockRunner(real.adapter)


@pytest.fixture(scope="module")
def run_blocks(real, runner):
    return LensSpaceBlocks(runner, real.lens, RUN_RIDGE)


@pytest.fixture(scope="module")
def ridge_blocks(real, runner):
    """The second lens, fitted by least squares at SECOND_RIDGE on the layers that swap (12, 13)
    reads (12, 13, 14); the other translators stay the identity, which the swap never inverts."""
    lens = empty_lens(real.adapter, "ridge")
    final = real.cache.final("train")[:, 1:].flatten(0, 1).float()
    with torch.no_grad():
        for layer in (12, 13, 14):
            h = real.cache.load(layer, "train")[:, 1:].flatten(0, 1).float()
            weight, bias = fit_affine(h, final, SECOND_RIDGE)
            lens.layer_translators[layer].weight.copy_(weight)
            lens.layer_translators[layer].bias.copy_(bias)
    return LensSpaceBlocks(runner, lens, SECOND_RIDGE)


def test_position_zero_is_the_native_permuted_run(real, runner, run_blocks):
    """Position 0 (the attention sink) attends only to itself, and the translators were never
    fitted on it: passed natively, it is exactly the native run of the same permuted order."""
    h = real.cache.load(12, "eval")[:2].float()
    perm = swap(real.adapter.n_layers, 12, 13)
    native = runner.run(h, 12, perm.order)
    assert float(native[:, 0].norm(dim=-1).min()) > 100  # the sink: far above the other tokens
    torch.testing.assert_close(run_blocks.run(h, perm)[:, 0], native[:, 0], rtol=1e-4, atol=1e-3)
    # in the model's own order lens space is the model itself, at every position
    identity = Permutation(tuple(range(12, real.adapter.n_layers)), 12, 12, 12)
    torch.testing.assert_close(run_blocks.run(h, identity), runner.run(h, 12), rtol=1e-4, atol=1e-2)


def test_run_lens_moves_adjacent_blocks_inputs_by_more_than_their_norm(real, run_blocks):
    """At the run's ridge the wrapper hands the first swapped block T_{i+1}^-1(T_i(h)), which
    differs from h by several times its norm (35x / 6x / 7x measured on the refined lens)."""
    n_layers = real.adapter.n_layers
    for i in PAIRS:
        h = real.cache.load(i, "eval")[:2].float()
        assert float(run_blocks.distortion(h, swap(n_layers, i, i + 1)).mean()) > 1, i
    assert min(run_blocks.conditions) > 1e3


def test_lens_space_swap_measures_the_translators(real, runner, run_blocks, ridge_blocks):
    """Swap (12, 13): at the run's ridge the lens-space cost dwarfs the native one; under the
    second ridge the distortion falls below 1 and the cost comes back to the native scale."""
    spaces = {"lens": run_blocks, "lens_ridge": ridge_blocks}
    rows = measure(
        runner,
        real.cache,
        [swap(real.adapter.n_layers, 12, 13)],
        spaces,
        n_boot=50,
        seed=0,
        n_sequences=2,
    )
    by_space = {r["space"]: r for r in rows}
    native, lens, ridge = by_space["native"], by_space["lens"], by_space["lens_ridge"]
    assert lens["kl"] > 10 * native["kl"] and lens["distortion"] > 1
    assert ridge["distortion"] < 1 and ridge["kl"] < 3 * native["kl"]
    assert ridge["ridge"] == SECOND_RIDGE and native["ridge"] is None
    statement = translator_dominated(pd.DataFrame([{**r, "kind": "swap"} for r in rows]))
    assert statement is not None and "measure the translators rather than the model" in statement
    assert "the lens space (lens ridge 0.001)" in statement and "(dominated)" in statement
    assert "the lens_ridge space (lens ridge 10)" in statement and "(not dominated)" in statement


def _composed(real, runner, h, perm):
    """``g_{order[k]}`` composed one block at a time as defined, each wrapper translating in and
    out of lens space (float64, T_b^-1 by a linear solve): the reference for the run."""
    eye = torch.eye(real.adapter.d_model, dtype=torch.float64)
    maps = [
        (eye + t.weight.detach().double(), t.bias.detach().double())
        for t in real.lens.layer_translators
    ]

    def to_lens(x, layer):
        return (
            x.double()
            if layer == real.adapter.n_layers
            else x.double() @ maps[layer][0].T + maps[layer][1]
        )

    first, z = h[:, :1], to_lens(h[:, 1:], perm.start)
    for b in perm.order:
        m, bias = maps[b]
        native = torch.linalg.solve(m, (z - bias).unsqueeze(-1)).squeeze(-1).float()
        out = runner.call_block(b, torch.cat([first, native], dim=1))
        first, z = out[:, :1], to_lens(out[:, 1:], b + 1)
    return torch.cat([first, z.float()], dim=1)


@pytest.mark.parametrize("perm_args", [("swap", 12, 13), ("window", 20, 23), ("swap", 27, 29)])
def test_lens_space_run_is_the_composition_of_wrapped_blocks(real, runner, run_blocks, perm_args):
    """The run translates only where the order jumps; the wrappers' T_{b+1}^-1 T_{b+1} between
    consecutive blocks cancel, so it equals the block-by-block composition on the real model."""
    kind, i, j = (
        perm_args  # (27, 29): the order ends in block 27, so the run ends translated by T_28
    )
    n = real.adapter.n_layers
    perm = (
        swap(n, i, j) if kind == "swap" else Permutation((22, 20, 23, 21, *range(24, n)), i, i, j)
    )
    h = real.cache.load(i, "eval")[:2].float()
    got, expected = run_blocks.run(h, perm), _composed(real, runner, h, perm)
    native = runner.run(h, i)
    assert float((got - native)[:, 1:].norm() / native[:, 1:].norm()) > 0.05  # the swap moves it
    assert float((got - expected)[:, 1:].norm() / expected[:, 1:].norm()) < 1e-4
    # in the model's own order nothing is translated: the lens-space run is the model's
    identity = Permutation(tuple(range(i, n)), i, i, i)
    torch.testing.assert_close(run_blocks.run(h, identity), native, rtol=0, atol=0)
