"""H0: does the SVD of the unembedding split lens space into output and internal subspaces?

At one layer, remove a subspace from ``z = T_i(h_i)`` and measure
KL(p_lens(z) || p_lens(z_ablated)) over held-out tokens, for every cell of the grid.

The head after ``z`` is linear but for the norm's scale, so the logits of an ablated vector
are the clean logits minus the head applied to the removed part: a ``[k, V]`` product per
subspace and site, shared by the zero and mean modes (:class:`LinearHead`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.experiments.grid import AblationGrid, CellResults
from lensspace.lenses import translate
from lensspace.stats import kl_from_logprobs
from lensspace.subspaces import Basis, random_subspace, select


def subspace_basis(bases: dict[str, Basis], grid: AblationGrid, layer: int, subspace: str, k: int,
                   basis: str, draw: int = 0) -> torch.Tensor:
    """The [d, k] orthonormal basis of one cell (random: its own seeded draw)."""
    if subspace == "random":
        vectors = next(iter(bases.values())).vectors
        return random_subspace(vectors.shape[0], k, grid.random_seed(layer, k, basis, draw), vectors.device)
    return select(bases[basis].vectors, subspace, k)


@dataclass(frozen=True)
class _Prepared:
    """One subspace's products with the head: ``q`` [d, k], ``c_q`` = C q, and [V, k] maps."""

    q: torch.Tensor
    c_q: torch.Tensor
    g_q: torch.Tensor
    g_c_q: torch.Tensor


class LinearHead:
    """The final norm and unembedding as ``logits = G u + c0`` with ``u = C z / s(C z)``.

    ``G = W_U diag(g)``, ``c0 = W_U beta + b_U`` (zero without biases), ``C`` centres (LayerNorm)
    or is the identity (RMSNorm), ``s(x) = sqrt(mean(x^2) + eps)`` (1 without a final norm).
    These are the logits before the family's soft-cap; :meth:`output` applies it.
    """

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        w = adapter.unembedding.detach().float()
        self.g = w * adapter.norm_gain.detach().float()
        bias, out_bias = adapter.norm_bias, adapter.unembedding_bias
        self.c0 = w @ bias.detach().float() if bias is not None else torch.zeros(w.shape[0], device=w.device)
        if out_bias is not None:
            self.c0 = self.c0 + out_bias.detach().float()
        self.centred = adapter.norm_kind == "layernorm"

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.centre(x)

    def scale(self, cz: torch.Tensor) -> torch.Tensor:
        return self.adapter.norm_scale(cz)

    def output(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from the linear ones: the family's soft-cap (identity for most)."""
        return self.adapter.cap_logits(logits)

    def prepare(self, q: torch.Tensor) -> _Prepared:
        c_q = q - q.mean(0, keepdim=True) if self.centred else q
        return _Prepared(q, c_q, self.g @ q, self.g @ c_q)

    def clean(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of ``z`` and the norm's scale ``s(C z)`` [..., 1]."""
        cz = self.centre(z)
        s = self.scale(cz)
        return (cz / s) @ self.g.T + self.c0, s

    def ablated(self, z: torch.Tensor, clean: torch.Tensor, s: torch.Tensor, p: _Prepared,
                site: str, means: dict[str, torch.Tensor], modes: tuple[str, ...]):
        """Per mode: (logits, relative edit size) with span(q) ablated at ``site``.

        pre_norm: ``z' = z - q q^T (z - m)``, renormalised; post_norm: ``u' = u - q q^T (u - m)``
        with ``u = C z / s`` and the scale frozen (``m`` = 0 for zero, the training mean for mean).
        """
        x = z if site == "pre_norm" else self.centre(z) / s
        linear = p.g_c_q if site == "pre_norm" else p.g_q
        coeff = x @ p.q
        removed = coeff @ linear.T
        out = {}
        for mode in modes:
            a, r = coeff, removed
            if mode == "mean":
                shift = means[site] @ p.q
                a, r = coeff - shift, removed - shift @ linear.T
            edit = a.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)
            if site == "pre_norm":
                s_new = self.scale(self.centre(z) - a @ p.c_q.T)
                logits = (s * (clean - self.c0) - r) / s_new + self.c0
            else:
                logits = clean - r
            out[mode] = (logits, edit)
        return out


@torch.no_grad()
def run_layer(adapter: Adapter, lens: TunedLens, cache: ActivationCache, bases: dict[str, Basis],
              layer: int, grid: AblationGrid, chunk: int = 4) -> CellResults:
    """Every grid cell at one layer, per held-out sequence."""
    cells = grid.variants(adapter.d_model)
    head = LinearHead(adapter)
    prepared = {(c.subspace, c.k, c.basis, c.draw): head.prepare(
        subspace_basis(bases, grid, layer, c.subspace, c.k, c.basis, c.draw)) for c in cells}
    z_train = translate(lens, cache.load(layer, "train")[:, 1:], layer)
    means = {"pre_norm": z_train.mean((0, 1)), "post_norm": adapter.normalize(z_train).mean((0, 1))}
    del z_train
    by_subspace: dict[tuple, dict[str, list]] = {}
    for cell in cells:
        by_subspace.setdefault((cell.subspace, cell.k, cell.basis, cell.draw), {}).setdefault(cell.site, []).append(cell)
    results = CellResults(layer, grid)
    h = cache.load(layer, "eval")
    for start in range(0, len(h), chunk):
        z = translate(lens, h[start: start + chunk, 1:], layer).float()
        clean, s = head.clean(z)
        clean_logp = head.output(clean).log_softmax(-1)
        clean_p = clean_logp.exp()
        for key, sites in by_subspace.items():
            for site, site_cells in sites.items():
                modes = tuple(c.mode for c in site_cells)
                ablated = head.ablated(z, clean, s, prepared[key], site, means, modes)
                for cell in site_cells:
                    logits, edit = ablated[cell.mode]
                    results.add(cell, kl_from_logprobs(clean_logp, head.output(logits).log_softmax(-1), clean_p), edit)
    return results


@torch.no_grad()
def norm_shares(adapter: Adapter, lens: TunedLens, cache: ActivationCache, bases: dict[str, Basis],
                layer: int, grid: AblationGrid) -> list[dict]:
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
                    rows.append({"layer": layer, "site": site, "basis": basis, "subspace": subspace,
                                 "k": k, "share": float((constant + varying) / total),
                                 "constant_share": float(constant / total),
                                 "varying_share": float(varying / total),
                                 "constant_norm": float(constant.sqrt()),
                                 "varying_rms": float(varying.sqrt()), "n_tokens": len(x)})
    return rows
