"""H0: does the SVD of the unembedding split lens space into output and internal subspaces?

At one layer, remove a subspace from ``z = T_i(h_i)`` and measure
KL(p_lens(z) || p_lens(z_ablated)) over held-out tokens, for every cell of the grid.

The head after ``z`` is linear but for the norm's scale (:class:`LinearHead`), so a cell's
logits are ``(A - R + alpha) / sigma + c0 + beta``: ``A`` the clean logits' numerator (once per
chunk of tokens); ``R`` a rank-k product ``[N, k] x [k, V]``, shared by the zero and mean modes,
by both sites where the norm does not centre (RMSNorm), and by the two halves of a basis (they
are complements, so the internal half's ``A - R`` is the output half's ``R``); ``alpha`` (before
the norm) or ``beta`` (after it) the mean ablation's constant logit vector, computed once per
layer; ``sigma`` the norm's scale of the ablated vector, a ``d``-sized computation. The KL then
needs ``p . logits``, which comes from one pass per product and one matrix product for all
constant vectors, and the logits' log-sum-exp: one pass per cell (:func:`_logsumexp`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.experiments.grid import AblationGrid, Cell, CellResults
from lensspace.lenses import translate
from lensspace.subspaces import Basis, random_subspace, select


def subspace_basis(bases: dict[str, Basis], grid: AblationGrid, layer: int, subspace: str, k: int,
                   basis: str, draw: int = 0) -> torch.Tensor:
    """The [d, k] orthonormal basis of one cell (random: its own seeded draw)."""
    if subspace == "random":
        vectors = next(iter(bases.values())).vectors
        return random_subspace(vectors.shape[0], k, grid.random_seed(layer, k, basis, draw), vectors.device)
    return select(bases[basis].vectors, subspace, k)


@dataclass
class _Product:
    """``R = (x @ q) @ lin^T`` for one subspace ``q``: ``x`` is ``z`` (``source`` pre_norm) or
    ``C z`` (post_norm), ``lin`` = ``G C q`` or ``G q`` [V, k]."""

    q: torch.Tensor
    source: str
    lin: torch.Tensor


@dataclass
class _Ablation:
    """One subspace at one site: its basis ``q`` (and ``C q``), the product it reads (its own,
    or the complement's: then its numerator is that product's ``R`` instead of ``A - R``), and
    per mode the coefficient shift ``m q`` and the constant logit vector (None for zero)."""

    cells: list[Cell]
    site: str
    q: torch.Tensor
    c_q: torch.Tensor
    product: int
    complement: bool
    shift: dict[str, torch.Tensor | None]
    const: dict[str, torch.Tensor | None]


class LinearHead:
    """The final norm and unembedding as ``logits = G u + c0`` with ``u = C z / s(C z)``.

    ``G = W_U diag(g)``, ``c0 = W_U beta + b_U`` (None without biases), ``C`` centres (LayerNorm)
    or is the identity (RMSNorm), ``s(x) = sqrt(mean(x^2) + eps)`` (1 without a final norm).
    These are the logits before the family's soft-cap: a capped family (Gemma 2) takes the
    direct path per cell (:func:`_grid_kls`).
    """

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        w = adapter.unembedding.detach().float()
        self.g = w * adapter.norm_gain.detach().float()
        bias, out_bias = adapter.norm_bias, adapter.unembedding_bias
        self.c0 = w @ bias.detach().float() if bias is not None else None
        if out_bias is not None:
            self.c0 = out_bias.detach().float() if self.c0 is None else self.c0 + out_bias.detach().float()
        self.centred = adapter.norm_kind == "layernorm"
        self.capped = adapter.logit_softcap is not None

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.centre(x)

    def scale(self, cz: torch.Tensor) -> torch.Tensor:
        return self.adapter.norm_scale(cz)

    def output(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from the linear ones: the family's soft-cap (identity for most)."""
        return self.adapter.cap_logits(logits)

    def clean(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of ``z`` and the norm's scale ``s(C z)`` [..., 1]."""
        cz = self.centre(z)
        s = self.scale(cz)
        logits = (cz / s) @ self.g.T
        return (logits + self.c0 if self.c0 is not None else logits), s

    def plan(self, qs: dict[tuple, torch.Tensor], cells: list[Cell],
             means: dict[str, torch.Tensor]) -> tuple[list[_Product], list[_Ablation]]:
        """The products and ablations that give every cell: one product per subspace (and per
        site where the norm centres), none for a half whose complement is in the grid."""
        d = self.g.shape[1]
        products: dict[tuple, int] = {}
        product_list: list[_Product] = []

        def product(key: tuple, site: str) -> int:
            pkey = (key, site if self.centred else "any")
            if pkey not in products:
                q = qs[key]
                basis = self._centre_cols(q) if site == "pre_norm" else q
                products[pkey] = len(product_list)
                product_list.append(_Product(q, site, self.g @ basis))
            return products[pkey]

        grouped: dict[tuple, list[Cell]] = {}
        for cell in cells:
            grouped.setdefault(((cell.subspace, cell.k, cell.basis, cell.draw), cell.site), []).append(cell)
        ablations = []
        for (key, site), site_cells in grouped.items():
            subspace, k, basis, draw = key
            partner = ("output", k, basis, draw)
            complement = subspace == "internal" and 2 * k == d and partner in qs
            q = qs[key]
            c_q = self._centre_cols(q)
            shift: dict[str, torch.Tensor | None] = {}
            const: dict[str, torch.Tensor | None] = {}
            for cell in site_cells:
                if cell.mode == "mean":
                    m_q = means[site] @ q
                    # the mean's component, carried to the logits: (m q)(G C q)^T or (m q)(G q)^T
                    shift["mean"], const["mean"] = m_q, (m_q @ (c_q if site == "pre_norm" else q).T) @ self.g.T
                else:
                    shift[cell.mode], const[cell.mode] = None, None
            ablations.append(_Ablation(site_cells, site, q, c_q, product(partner if complement else key, site),
                                       complement, shift, const))
        return product_list, ablations

    def _centre_cols(self, q: torch.Tensor) -> torch.Tensor:
        return q - q.mean(0, keepdim=True) if self.centred else q


def _logsumexp(num: torch.Tensor, num_max: torch.Tensor, inv_sigma: torch.Tensor,
               alpha: torch.Tensor | None, beta: torch.Tensor | None, c0: torch.Tensor | None,
               c0_max: torch.Tensor | float) -> torch.Tensor:
    """Log-sum-exp [n, 1] of ``x = (num + alpha) * inv_sigma + beta + c0`` in one pass, shifted
    by an upper bound of each row's max built from ``num``'s row max (``num_max``) and the
    constants' maxima. A row whose bound lies so far above its max that the sum underflows
    (the bound only has to keep the exponentials representable) is redone exactly."""
    bound = num_max * inv_sigma + c0_max
    if alpha is not None:
        bound = bound + alpha.max() * inv_sigma
    if beta is not None:
        bound = bound + beta.max()
    x = torch.addcmul(-bound, num, inv_sigma)
    for vector, scale in ((alpha, inv_sigma), (beta, None), (c0, None)):
        if vector is not None:
            x.addcmul_(vector.unsqueeze(0), scale) if scale is not None else x.add_(vector)
    lse = bound + x.exp_().sum(-1, keepdim=True).log()
    bad = ~torch.isfinite(lse.squeeze(-1)) | (lse.squeeze(-1) < bound.squeeze(-1) - 60)
    if bad.any():
        rows = num[bad] * inv_sigma[bad]
        if alpha is not None:
            rows += alpha * inv_sigma[bad]
        for vector in (beta, c0):
            if vector is not None:
                rows += vector
        lse[bad] = torch.logsumexp(rows, -1, keepdim=True)
    return lse


@torch.no_grad()
def _grid_kls(head: LinearHead, z: torch.Tensor, products: list[_Product],
              ablations: list[_Ablation]) -> dict[Cell, tuple[torch.Tensor, torch.Tensor]]:
    """Per cell: token KL(p_lens(z) || p_lens(z_ablated)) and relative edit size, ``z`` [N, d].

    With ``l = A / s + c0`` the clean logits and ``x = (N + alpha) / sigma + c0 + beta`` a cell's,
    ``KL = p . (l - x) + LSE(x) - LSE(l)`` and ``p . (l - x) = p.A / s - (p.N + p.alpha) / sigma
    - p.beta``: the dot products come from one pass per product (``p . R``) and one matrix
    product for every constant vector, so a cell costs a single pass for its log-sum-exp,
    shifted by an upper bound of its max (from the product's row max) instead of the max itself.
    """
    cz = head.centre(z)
    s = head.scale(cz)
    inv_s = 1 / s
    a = cz @ head.g.T  # the clean logits' numerator: logits = A / s + c0
    clean = a * inv_s
    if head.c0 is not None:
        clean.add_(head.c0)
    if head.capped:  # the soft-cap is not linear: every cell's logits are formed and capped
        clean_logp = head.output(clean).log_softmax(-1)
        p = clean_logp.exp()
    else:
        log_z = torch.logsumexp(clean, -1, keepdim=True)
        p = clean.sub_(log_z).exp_()
        del clean
    p_a = torch.linalg.vecdot(p, a).unsqueeze(-1)
    const_keys = [(id(ab), m) for ab in ablations for m in ab.const if ab.const[m] is not None]
    p_const = {}
    if const_keys:  # p . alpha (or beta) of every mean ablation, in one matrix product
        dots = p @ torch.stack([ab.const[m] for ab in ablations for m in ab.const if ab.const[m] is not None], 1)
        p_const = {key: dots[:, i: i + 1] for i, key in enumerate(const_keys)}
    c0_max = head.c0.max() if head.c0 is not None else 0.0
    out = {}
    by_product: dict[int, list[_Ablation]] = {}
    for ab in ablations:
        by_product.setdefault(ab.product, []).append(ab)
    for index, product in enumerate(products):
        r = ((z if product.source == "pre_norm" else cz) @ product.q) @ product.lin.T
        p_r = torch.linalg.vecdot(p, r).unsqueeze(-1)
        p_r_of = {index: p_r}
        users = by_product.get(index, [])
        numerators = {}
        if any(ab.complement for ab in users):
            numerators[True] = (r, p_r, r.amax(-1, keepdim=True))
        if any(not ab.complement for ab in users):
            n = a - r
            numerators[False] = (n, p_a - p_r, n.amax(-1, keepdim=True))
        del r
        for ab in users:
            num, p_num, num_max = numerators[ab.complement]
            x_site = z if ab.site == "pre_norm" else cz * inv_s
            coeff = x_site @ ab.q
            for cell in ab.cells:
                shift, const = ab.shift[cell.mode], ab.const[cell.mode]
                a_k = coeff - shift if shift is not None else coeff
                edit = a_k.norm(dim=-1) / x_site.norm(dim=-1).clamp_min(1e-30)
                inv_sigma = 1 / head.scale(cz - a_k @ ab.c_q.T) if ab.site == "pre_norm" else inv_s
                p_const_cell = p_const[(id(ab), cell.mode)] if const is not None else 0.0
                before = const if const is not None and ab.site == "pre_norm" else None  # alpha
                after = const if const is not None and ab.site == "post_norm" else None  # beta
                if head.capped:
                    x = (num + before) * inv_sigma if before is not None else num * inv_sigma
                    for vector in (after, head.c0):
                        if vector is not None:
                            x = x + vector
                    kl = (p * (clean_logp - head.output(x).log_softmax(-1))).sum(-1, keepdim=True)
                    out[cell] = (kl.squeeze(-1), edit)
                    continue
                lse = _logsumexp(num, num_max, inv_sigma, before, after, head.c0, c0_max)
                p_alpha = p_const_cell if before is not None else 0.0
                p_beta = p_const_cell if after is not None else 0.0
                if ab.complement:
                    kl = p_a * inv_s - (p_num + p_alpha) * inv_sigma - p_beta + lse - log_z
                else:  # p_num = p.A - p.R: grouped so that post_norm (sigma = s) keeps p.R / s exactly
                    kl = p_a * (inv_s - inv_sigma) + (p_r_of[ab.product] - p_alpha) * inv_sigma - p_beta + lse - log_z
                out[cell] = (kl.squeeze(-1), edit)
        del numerators
    return out


@torch.no_grad()
def run_layer(adapter: Adapter, lens: TunedLens, cache: ActivationCache, bases: dict[str, Basis],
              layer: int, grid: AblationGrid, chunk: int = 8) -> CellResults:
    """Every grid cell at one layer, per held-out sequence."""
    cells = grid.variants(adapter.d_model)
    head = LinearHead(adapter)
    qs = {(c.subspace, c.k, c.basis, c.draw): subspace_basis(bases, grid, layer, c.subspace, c.k, c.basis, c.draw)
          for c in cells}
    z_train = translate(lens, cache.load(layer, "train")[:, 1:], layer)
    means = {"pre_norm": z_train.mean((0, 1)), "post_norm": adapter.normalize(z_train).mean((0, 1))}
    del z_train
    products, ablations = head.plan(qs, cells, means)
    results = CellResults(layer, grid)
    h = cache.load(layer, "eval")
    for start in range(0, len(h), chunk):
        z = translate(lens, h[start: start + chunk, 1:], layer).float()
        shape = z.shape[:-1]
        for cell, (kl, edit) in _grid_kls(head, z.reshape(-1, z.shape[-1]), products, ablations).items():
            results.add(cell, kl.reshape(shape), edit.reshape(shape))
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
