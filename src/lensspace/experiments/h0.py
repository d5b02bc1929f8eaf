"""H0: does the SVD of the unembedding split lens space into output and internal subspaces?

At one layer, remove a subspace from ``z = T_i(h_i)`` and measure
KL(p_lens(z) || p_lens(z_ablated)) over held-out tokens, for every variant of the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.lenses import estimate_row, translate
from lensspace.stats import bootstrap_mean, kl_from_logprobs
from lensspace.subspaces import Basis, ablate, select


@dataclass(frozen=True)
class AblationGrid:
    """The variants run at each layer; ``random`` is computed once per (k, mode, site)."""

    subspaces: tuple[str, ...] = ("output", "internal", "random")
    ks: tuple[int | str, ...] = ("half",)
    bases: tuple[str, ...] = ("unembed", "unembed_centered")
    modes: tuple[str, ...] = ("zero", "mean")
    sites: tuple[str, ...] = ("pre_norm", "post_norm")
    seed: int = 0
    n_boot: int = 1000

    def resolve_k(self, d_model: int) -> list[int]:
        """Subspace sizes: integers as given, ``half`` = d_model // 2, ``quarter`` = d_model // 4."""
        named = {"half": d_model // 2, "quarter": d_model // 4}
        return sorted({named[k] if isinstance(k, str) else int(k) for k in self.ks})

    def variants(self, d_model: int) -> list[tuple[str, int, str, str, str]]:
        """(subspace, k, basis, mode, site) for every cell; random carries basis 'random'."""
        cells = []
        for subspace, k, mode, site in product(self.subspaces, self.resolve_k(d_model), self.modes, self.sites):
            for basis in (("random",) if subspace == "random" else self.bases):
                cells.append((subspace, k, basis, mode, site))
        return cells


def subspace_basis(bases: dict[str, Basis], subspace: str, k: int, basis: str, seed: int) -> torch.Tensor:
    """The [d, k] orthonormal basis of one grid cell (random: seeded by ``seed`` and ``k``)."""
    vectors = next(iter(bases.values())).vectors if subspace == "random" else bases[basis].vectors
    return select(vectors, subspace, k, seed=seed * 1_000_003 + k)


@torch.no_grad()
def run_layer(adapter: Adapter, lens: TunedLens, cache: ActivationCache, bases: dict[str, Basis],
              layer: int, grid: AblationGrid, chunk: int = 4) -> list[dict]:
    """All grid cells at one layer; one row per cell with the bootstrap interval."""
    cells = grid.variants(adapter.d_model)
    qs = {(s, k, b): subspace_basis(bases, s, k, b, grid.seed) for s, k, b, _, _ in cells}
    z_train = translate(lens, cache.load(layer, "train")[:, 1:], layer)
    means = {"pre_norm": z_train.mean((0, 1)), "post_norm": adapter.normalize(z_train).mean((0, 1))}
    del z_train
    h = cache.load(layer, "eval")
    kls: dict[tuple, list[torch.Tensor]] = {cell: [] for cell in cells}
    for start in range(0, len(h), chunk):
        z = translate(lens, h[start: start + chunk, 1:], layer)
        u = adapter.normalize(z)
        clean = adapter.logits_from_normalized(u).log_softmax(-1)
        for cell in cells:
            subspace, k, basis, mode, site = cell
            q = qs[(subspace, k, basis)]
            if site == "pre_norm":
                logits = adapter.logits(ablate(z, q, mode, means[site]))
            else:  # post_norm: the norm's scale is frozen from the intact vector
                logits = adapter.logits_from_normalized(ablate(u, q, mode, means[site]))
            kls[cell].append(kl_from_logprobs(clean, logits.log_softmax(-1)))
    return cell_rows(layer, kls, grid)


def cell_rows(layer: int, kls: dict[tuple, list[torch.Tensor]], grid: AblationGrid) -> list[dict]:
    """One output row per grid cell: its token-level KLs [n_seq, n_pos] as mean and interval."""
    rows = []
    for (subspace, k, basis, mode, site), parts in kls.items():
        est = bootstrap_mean(torch.cat(parts), n_boot=grid.n_boot, seed=grid.seed)
        keys = {"layer": layer, "subspace": subspace, "k": k, "basis": basis, "mode": mode, "site": site}
        rows.append(estimate_row(keys, est))
    return rows
