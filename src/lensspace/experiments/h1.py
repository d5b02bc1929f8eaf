"""H1: the SVD subspaces in the model's own residual stream.

At layer ``i``, ablate a subspace at every position but the first, run the rest of the model
from the cached residual with the block runner, and measure KL(p_model || p_ablated) of the
final output. Bases: the unembedding's (``unembed``, ``unembed_centered``), projected out of
``h_i`` directly; and ``lens_pullback``, the lens-space ablation of the ``unembed`` subspace
carried exactly into the residual through translator ``i`` (:class:`LensPullback`:
``T_i(h') = ablate(T_i(h))``). Its control, ``random_lens_pullback``, is the same operation
on a random lens-space subspace.
"""

from __future__ import annotations

from typing import Callable

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.experiments.grid import AblationGrid, Cell, CellResults, relative_edit
from lensspace.experiments.h0 import subspace_basis
from lensspace.lenses import translate
from lensspace.runner import BlockRunner
from lensspace.stats import KLReference
from lensspace.subspaces import Basis, LensPullback, ablate

PULLED_BACK = "unembed"  # the lens-space basis that lens_pullback carries into the residual

Edit = Callable[[torch.Tensor], torch.Tensor]


def cell_edit(cell: Cell, bases: dict[str, Basis], lens: TunedLens, layer: int, grid: AblationGrid,
              h_mean: torch.Tensor, z_mean: torch.Tensor) -> Edit:
    """The residual edit ``h -> h'`` of one cell."""
    if cell.basis in ("lens_pullback", "random_lens_pullback"):
        lens_basis = PULLED_BACK if cell.basis == "lens_pullback" else cell.basis
        q = subspace_basis(bases, grid, layer, cell.subspace, cell.k, lens_basis, cell.draw)
        translator = lens.layer_translators[layer]
        pulled = LensPullback(translator.weight.detach(), translator.bias.detach(), q)
        return lambda h: pulled.apply(h, cell.mode, z_mean)
    q = subspace_basis(bases, grid, layer, cell.subspace, cell.k, cell.basis, cell.draw)
    return lambda h: ablate(h, q, cell.mode, h_mean)


@torch.no_grad()
def run_layer(runner: BlockRunner, lens: TunedLens, cache: ActivationCache, bases: dict[str, Basis],
              layer: int, grid: AblationGrid, chunk: int = 4) -> CellResults:
    """Every grid cell at one layer, resuming from the cache, per held-out sequence."""
    h_train = cache.load(layer, "train")[:, 1:]
    h_mean = h_train.mean((0, 1))
    z_mean = translate(lens, h_train, layer).double().mean((0, 1))
    del h_train
    edits = {cell: cell_edit(cell, bases, lens, layer, grid, h_mean, z_mean)
             for cell in grid.variants(runner.adapter.d_model)}
    results = CellResults(layer, grid)
    h = cache.load(layer, "eval")
    head = runner.adapter.logits

    def evaluated_logits(residual: torch.Tensor) -> torch.Tensor:  # the head on positions 1.. only
        return head(runner.run(residual, start=layer)[:, 1:])

    for start in range(0, len(h), chunk):
        hb = h[start: start + chunk]
        # the reference runs the same path without the ablation, so storage rounding cancels
        clean = KLReference(evaluated_logits(hb).log_softmax(-1))
        for cell, edit in edits.items():
            ablated = hb.clone()
            ablated[:, 1:] = edit(hb[:, 1:])
            results.add(cell, clean.kl(evaluated_logits(ablated)), relative_edit(hb[:, 1:], ablated[:, 1:]))
    return results
