"""H1: the SVD subspaces in the model's own residual stream.

At layer ``i``, ablate a subspace at every position but the first, run the rest of the model
with the block runner, and measure KL(p_model || p_ablated) of the final output. A job's layers
resume from the cached residual at its earliest layer (:func:`run_layers`). Bases: the unembedding's
(``unembed``, ``unembed_centered``), projected out of
``h_i`` directly; and ``lens_pullback``, the lens-space ablation of the ``unembed`` subspace
carried exactly into the residual through translator ``i`` (:class:`LensPullback`:
``T_i(h') = ablate(T_i(h))``). Its control, ``random_lens_pullback``, is the same operation
on a random lens-space subspace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.divergences import KLReference
from lensspace.experiments.grid import (
    AblationGrid,
    Cell,
    CellResults,
    relative_edit,
    subspace_basis,
)
from lensspace.lenses import translate
from lensspace.runner import BlockRunner, recording
from lensspace.subspaces import Basis, LensPullback, ablate

PULLED_BACK = "unembed"  # the lens-space basis that lens_pullback carries into the residual

Edit = Callable[[torch.Tensor], torch.Tensor]


def cell_edit(
    cell: Cell,
    bases: dict[str, Basis],
    lens: TunedLens,
    layer: int,
    grid: AblationGrid,
    h_mean: torch.Tensor,
    z_mean: torch.Tensor,
) -> Edit:
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
def run_layers(
    runner: BlockRunner,
    lens: TunedLens,
    cache: ActivationCache,
    bases: dict[str, Basis],
    layers: Sequence[int],
    grid: AblationGrid,
    chunk: int = 4,
) -> dict[int, CellResults]:
    """Every grid cell at each of ``layers``, resuming from the cache, per held-out sequence.

    Per chunk of sequences one clean pass from the cached residual at the earliest layer gives
    every layer its starting residual (in float32, as the model computes it) and the reference
    output for all of them: the reference runs the same path as the cells without the ablation,
    so no storage rounding lies between them, and it costs one pass per job instead of one per
    layer. A layer's numbers therefore depend on how ``layers_per_job`` groups the layers by the
    cache's float16 storage rounding only (its start is recomputed from the job's first layer).
    """
    layers = sorted(set(layers))
    edits: dict[int, dict[Cell, Edit]] = {}
    for layer in layers:
        h_train = cache.load(layer, "train")[:, 1:]
        h_mean = h_train.mean((0, 1))
        z_mean = translate(lens, h_train, layer).double().mean((0, 1))
        del h_train
        edits[layer] = {
            cell: cell_edit(cell, bases, lens, layer, grid, h_mean, z_mean)
            for cell in grid.variants(runner.adapter.d_model)
        }
    results = {layer: CellResults(layer, grid) for layer in layers}
    root = layers[0]
    h = cache.load(root, "eval")
    head = runner.adapter.logits
    for first in range(0, len(h), chunk):
        starts: dict[int, torch.Tensor] = {}
        final = runner.run(h[first : first + chunk], root, interventions=recording(starts, layers))
        clean = KLReference.from_logits(head(final[:, 1:]))  # the head on positions 1.. only
        del final
        for layer in layers:
            hb = starts[layer]
            for cell, edit in edits[layer].items():
                ablated = hb.clone()
                ablated[:, 1:] = edit(hb[:, 1:])
                kl = clean.kl(head(runner.run(ablated, start=layer)[:, 1:]))
                results[layer].add(cell, kl, relative_edit(hb[:, 1:], ablated[:, 1:]))
    return results
