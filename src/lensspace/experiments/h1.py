"""H1: the SVD subspaces in the model's own residual stream.

At layer ``i``, remove a subspace from ``h_i`` (every position but the first), run the rest
of the model from the cached residual with the block runner, and measure
KL(p_model || p_ablated) of the final output. Bases: the unembedding's (``unembed``,
``unembed_centered``) applied to ``h_i`` directly, and ``lens_pullback``: the lens-space
subspace of the ``unembed`` basis pulled back through translator ``i``.
"""

from __future__ import annotations

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.experiments.h0 import AblationGrid, cell_rows
from lensspace.runner import BlockRunner
from lensspace.stats import kl_from_logprobs
from lensspace.subspaces import Basis, ablate, pullback, select

PULLED_BACK = "unembed"  # the lens-space basis that lens_pullback carries into the residual


def residual_basis(bases: dict[str, Basis], lens: TunedLens, layer: int, subspace: str, k: int,
                   basis: str, seed: int) -> torch.Tensor:
    """The [d, k'] orthonormal residual-stream basis of one cell (k' < k only if rank-deficient)."""
    if basis == "lens_pullback" and subspace != "random":
        lens_q = select(bases[PULLED_BACK].vectors, subspace, k)
        return pullback(lens.layer_translators[layer].weight.detach(), lens_q)
    vectors = bases[PULLED_BACK if basis in ("lens_pullback", "random") else basis].vectors
    return select(vectors, subspace, k, seed=seed * 1_000_003 + k)


@torch.no_grad()
def run_layer(runner: BlockRunner, lens: TunedLens, cache: ActivationCache, bases: dict[str, Basis],
              layer: int, grid: AblationGrid, chunk: int = 4) -> list[dict]:
    """All grid cells at one layer, resuming from the cache; one row per cell."""
    adapter = runner.adapter
    cells = grid.variants(adapter.d_model)
    qs = {(s, k, b): residual_basis(bases, lens, layer, s, k, b, grid.seed) for s, k, b, _, _ in cells}
    mean = cache.load(layer, "train")[:, 1:].mean((0, 1))
    h = cache.load(layer, "eval")
    kls: dict[tuple, list[torch.Tensor]] = {cell: [] for cell in cells}
    for start in range(0, len(h), chunk):
        hb = h[start: start + chunk]
        # the reference runs the same path without the ablation, so storage rounding cancels
        clean = runner.logits(hb, start=layer)[:, 1:].log_softmax(-1)
        for cell in cells:
            subspace, k, basis, mode, _ = cell
            ablated = hb.clone()
            ablated[:, 1:] = ablate(hb[:, 1:], qs[(subspace, k, basis)], mode, mean)
            logits = runner.logits(ablated, start=layer)[:, 1:]
            kls[cell].append(kl_from_logprobs(clean, logits.log_softmax(-1)))
    return cell_rows(layer, kls, grid)
