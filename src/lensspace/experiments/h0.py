"""H0: does the SVD of the unembedding split lens space into output and internal subspaces?

At one layer, remove a subspace from ``z = T_i(h_i)`` and measure
KL(p_lens(z) || p_lens(z_ablated)) over held-out tokens, for every cell of the grid.

Each cell's KL is read through the final norm and unembedding as a linear head, from the
logits' change alone (:mod:`lensspace.head`).
"""

from __future__ import annotations

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.experiments.grid import AblationGrid, CellResults, subspace_basis
from lensspace.head import LinearHead, grid_kls
from lensspace.lenses import translate
from lensspace.subspaces import Basis, select


@torch.no_grad()
def run_layer(
    adapter: Adapter,
    lens: TunedLens,
    cache: ActivationCache,
    bases: dict[str, Basis],
    layer: int,
    grid: AblationGrid,
    chunk: int = 8,
) -> CellResults:
    """Every grid cell at one layer, per held-out sequence."""
    cells = grid.variants(adapter.d_model)
    head = LinearHead(adapter)
    qs = {
        (c.subspace, c.k, c.basis, c.draw): subspace_basis(
            bases, grid, layer, c.subspace, c.k, c.basis, c.draw
        )
        for c in cells
    }
    z_train = translate(lens, cache.load(layer, "train")[:, 1:], layer)
    means = {"pre_norm": z_train.mean((0, 1)), "post_norm": adapter.normalize(z_train).mean((0, 1))}
    del z_train
    products, ablations = head.plan(qs, cells, means)
    results = CellResults(layer, grid)
    h = cache.load(layer, "eval")
    for start in range(0, len(h), chunk):
        z = translate(lens, h[start : start + chunk, 1:], layer).float()
        shape = z.shape[:-1]
        for cell, (kl, edit) in grid_kls(
            head, z.reshape(-1, z.shape[-1]), products, ablations
        ).items():
            results.add(cell, kl.reshape(shape), edit.reshape(shape))
    return results


@torch.no_grad()
def norm_shares(
    adapter: Adapter,
    lens: TunedLens,
    cache: ActivationCache,
    bases: dict[str, Basis],
    layer: int,
    grid: AblationGrid,
) -> list[dict]:
    """Share of the lens vectors' squared norm in each subspace, split into the constant part
    (the held-out mean's component) and the token-varying part; they add up exactly.

    Zero ablation removes both parts, mean ablation only the varying one: where the constant
    part dominates, the two modes measure different things.
    """
    h = cache.load(layer, "eval")[:, 1:]
    z = translate(lens, h, layer).reshape(-1, adapter.d_model).double()
    rows = []
    for site, x in (("pre_norm", z), ("post_norm", adapter.normalize(z.float()).double())):
        mu = x.mean(0)
        total = x.pow(2).sum(-1).mean()
        for basis in grid.bases:
            if basis not in bases:
                continue
            for subspace in ("output", "internal"):
                for k in grid.resolve_k(adapter.d_model):
                    q = select(bases[basis].vectors, subspace, k).double()
                    constant = (mu @ q).pow(2).sum()
                    varying = ((x - mu) @ q).pow(2).sum(-1).mean()
                    rows.append(
                        {
                            "layer": layer,
                            "site": site,
                            "basis": basis,
                            "subspace": subspace,
                            "k": k,
                            "share": float((constant + varying) / total),
                            "constant_share": float(constant / total),
                            "varying_share": float(varying / total),
                            "constant_norm": float(constant.sqrt()),
                            "varying_rms": float(varying.sqrt()),
                            "n_tokens": len(x),
                        }
                    )
    return rows
