"""The final norm and unembedding as a linear head, and the KLs of an ablation grid read through it.

The head after a lens vector ``z`` is linear but for the norm's scale (:class:`LinearHead`), so a
cell's logits are ``(A - D + alpha) / sigma + c0 + beta``: ``A`` the clean logits' numerator (once
per chunk of tokens); ``D`` the removed part's, a rank-k product ``[N, k] x [k, V]`` shared by the
zero and mean modes, by both sites where the norm does not centre (RMSNorm), and by the two
halves of a basis (they are complements, so the internal half's ``D`` is ``A`` minus the output
half's); ``alpha`` (before the norm) or ``beta`` (after it) the mean ablation's constant logit
vector, computed once per layer; ``sigma`` the norm's scale of the ablated vector, a
``d``-sized computation. The KL is assembled from the logits' change alone, whose terms are
small where the KL is (:func:`grid_kls`), so float32 keeps its relative precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lensspace import fused, gemm
from lensspace.adapter import Adapter
from lensspace.divergences import row_dot

if TYPE_CHECKING:
    from lensspace.experiments.grid import Cell


@dataclass
class _Product:
    """``R = (x @ q) @ lin^T`` for one subspace ``q``: ``x`` is ``z`` (``source`` pre_norm; the
    ablated vectors of a carried plan) or ``C z`` (post_norm), ``lin`` = ``G C q`` or ``G q``
    [V, k] (``q`` there: the carried columns ``M q`` of a carried plan)."""

    q: torch.Tensor
    source: str
    lin: torch.Tensor


@dataclass
class _Ablation:
    """One subspace at one site: its basis ``q`` (and ``C q``; ``C M q`` in a carried plan), the
    product it reads (its own, or the complement's: then its removed part's numerator is ``A - R``
    instead of ``R``), and per mode the coefficient shift ``m q`` and the constant logit vector
    (None for zero)."""

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
    direct path per cell (:func:`grid_kls`).
    """

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        w = adapter.unembedding.detach().float()
        self.g = w * adapter.norm_gain.detach().float()
        bias, out_bias = adapter.norm_bias, adapter.unembedding_bias
        self.c0 = w @ bias.detach().float() if bias is not None else None
        if out_bias is not None:
            self.c0 = (
                out_bias.detach().float()
                if self.c0 is None
                else self.c0 + out_bias.detach().float()
            )
        self.centred = adapter.norm_kind == "layernorm"
        self.capped = adapter.logit_softcap is not None

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.centre(x)

    def scale(self, cz: torch.Tensor) -> torch.Tensor:
        return self.adapter.norm_scale(cz)

    def rescale(
        self, cz: torch.Tensor, s: torch.Tensor, removed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``1 / sigma`` and ``1 / sigma - 1 / s`` for ``sigma = s(cz - removed)``: the difference
        from ``sigma^2 - s^2 = mean(removed^2 - 2 cz removed)``, not from two close inverses
        (None without a final norm, where both scales are 1)."""
        if self.adapter.norm_kind == "none":
            return 1 / s, None
        change = (removed * (removed - 2 * cz)).mean(-1, keepdim=True)
        sigma = self.scale(
            cz - removed
        )  # directly: accurate also where the ablation removes most of cz
        return 1 / sigma, -change / (s * sigma * (s + sigma))

    def output(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from the linear ones: the family's soft-cap (identity for most)."""
        return self.adapter.cap_logits(logits)

    def clean(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of ``z`` and the norm's scale ``s(C z)`` [..., 1]."""
        cz = self.centre(z)
        s = self.scale(cz)
        logits = gemm.linear(cz / s, self.g)
        return (logits + self.c0 if self.c0 is not None else logits), s

    def plan(
        self,
        qs: dict[tuple, torch.Tensor],
        cells: list[Cell],
        means: dict[str, torch.Tensor],
        carried: dict[tuple, torch.Tensor] | None = None,
    ) -> tuple[list[_Product], list[_Ablation]]:
        """The products and ablations that give every cell: one product per subspace (and per
        site where the norm centres), none for a half whose complement is in the grid.

        ``carried`` (per subspace, [d, k]) is for an ablation made before an affine map ``z = M x +
        b`` (H2's ``T_i E_i``): the subspace ``q`` is removed from ``x`` (the ``source`` of
        :func:`grid_kls`, whose mean is ``means["pre_norm"]``) and reaches ``z`` through
        ``M q``, so every cell acts at the norm's input whatever its site label, and the halves
        are not complements in ``z``."""
        d = self.g.shape[1]
        products: dict[tuple, int] = {}
        product_list: list[_Product] = []

        def columns(key: tuple) -> torch.Tensor:
            return qs[key] if carried is None else carried[key]

        def product(key: tuple, site: str) -> int:
            pkey = (key, site if self.centred else "any")
            if pkey not in products:
                out = columns(key)
                basis = self._centre_cols(out) if site == "pre_norm" else out
                products[pkey] = len(product_list)
                product_list.append(_Product(qs[key], site, self.g @ basis))
            return products[pkey]

        grouped: dict[tuple, list[Cell]] = {}
        for cell in cells:
            site = "pre_norm" if carried is not None else cell.site
            grouped.setdefault(((cell.subspace, cell.k, cell.basis, cell.draw), site), []).append(
                cell
            )
        ablations = []
        for (key, site), site_cells in grouped.items():
            subspace, k, basis, draw = key
            partner = ("output", k, basis, draw)
            complement = carried is None and subspace == "internal" and 2 * k == d and partner in qs
            q, out = qs[key], columns(key)
            c_q = self._centre_cols(out)
            shift: dict[str, torch.Tensor | None] = {}
            const: dict[str, torch.Tensor | None] = {}
            for cell in site_cells:
                if cell.mode == "mean":
                    m_q = means[site] @ q
                    # the mean's component, carried to the logits: (m q)(G C q)^T or (m q)(G q)^T
                    shift["mean"], const["mean"] = (
                        m_q,
                        (m_q @ (c_q if site == "pre_norm" else out).T) @ self.g.T,
                    )
                else:
                    shift[cell.mode], const[cell.mode] = None, None
            ablations.append(
                _Ablation(
                    site_cells,
                    site,
                    q,
                    c_q,
                    product(partner if complement else key, site),
                    complement,
                    shift,
                    const,
                )
            )
        return product_list, ablations

    def _centre_cols(self, q: torch.Tensor) -> torch.Tensor:
        return q - q.mean(0, keepdim=True) if self.centred else q


_SAFE_EXPONENT = fused.SAFE_EXPONENT


@dataclass
class _Clean:
    """The clean logits' parts that give rows of ``log p = A / s + c0 - log Z`` again (``A``
    [N, V]; ``inv_s``, ``log_z`` [N, 1]; ``c0`` [V] or None), for the rows formed in log space."""

    a: torch.Tensor
    inv_s: torch.Tensor
    c0: torch.Tensor | None
    log_z: torch.Tensor

    def log_p(self, rows: torch.Tensor) -> torch.Tensor:
        logits = self.a[rows] * self.inv_s[rows]
        return (logits + self.c0 if self.c0 is not None else logits) - self.log_z[rows]


def _kl_from_change(
    t: torch.Tensor, p: torch.Tensor, bound: torch.Tensor, clean: _Clean, scratch: torch.Tensor
) -> torch.Tensor:
    """Token KL(p || softmax(l + delta)) [n, 1] from ``t = delta - c`` [n, V], ``c`` a per-row
    shift near ``E_p[delta]`` that keeps ``t`` small: ``KL = log1p(E_p[expm1(t)]) - E_p[t]``,
    exact for any shift, and without the cancellation of two log-sum-exps or of ``E_p[e^t]``
    against 1. Rows where ``t`` passes :data:`_SAFE_EXPONENT` (looked for only where ``bound``
    [n, 1], an upper bound of each row's max, does) form those terms in log space
    (:func:`_large_rows_kl`). ``t`` and ``scratch`` (as large as ``t``: the products with ``p``,
    in memory already mapped) are overwritten.
    """
    s0 = torch.mul(p, t, out=scratch).sum(-1, keepdim=True)
    large, rows = bound.squeeze(-1) > _SAFE_EXPONENT, None
    if large.any():  # the bound is loose: the rows' own maxima decide
        large &= t.amax(-1) > _SAFE_EXPONENT
        if large.any():
            rows = large.nonzero().squeeze(-1)
            t_rows = t[rows]
    s1 = torch.mul(p, t.expm1_(), out=scratch).sum(-1, keepdim=True)
    kl = torch.log1p(s1) - s0
    if rows is not None:
        kl[rows] = _large_rows_kl(t_rows, p[rows], s0[rows], clean.log_p(rows))
    return kl.clamp_min_(0.0)


def _large_rows_kl(
    t_rows: torch.Tensor, p_rows: torch.Tensor, s0_rows: torch.Tensor, log_p: torch.Tensor
) -> torch.Tensor:
    """The KL of rows whose ``t`` passes :data:`_SAFE_EXPONENT`: their terms ``p (e^t - 1)`` where
    ``t`` is that large formed as ``exp(log p + t)`` (``log_p``: the rows' clean log-probabilities),
    and past float32's range (KL > 88 nats) the whole sum as a log-sum-exp."""
    terms = torch.where(t_rows > _SAFE_EXPONENT, (log_p + t_rows).exp(), p_rows * t_rows.expm1())
    exact = torch.log1p(terms.sum(-1, keepdim=True)) - s0_rows
    huge = ~torch.isfinite(exact.squeeze(-1))  # E_p[e^t] past float32: KL > 88 nats, log space
    if huge.any():
        exact[huge] = torch.logsumexp(log_p[huge] + t_rows[huge], -1, keepdim=True) - s0_rows[huge]
    return exact


def _fused_kl(
    change: _Change,
    a: torch.Tensor,
    d: torch.Tensor,
    p: torch.Tensor,
    c: torch.Tensor,
    clean: _Clean,
) -> torch.Tensor | None:
    """:func:`_kl_from_change` for one cell in one compiled pass over ``p``, ``a`` and ``d``
    (:mod:`lensspace.fused`), rows past :data:`_SAFE_EXPONENT` redone in log space by a second
    compiled loop (or eagerly, where it failed); None where the first could not be compiled."""
    # every argument its own tensor: the compiled graph is specialised on which inputs alias
    column = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)
    k1 = change.k1 if change.k1 is not None else column.clone()
    if change.alpha is not None:
        v, k3 = change.alpha, change.k2.clone()
    elif change.beta is not None:
        v, k3 = change.beta, column + 1
    else:
        v, k3 = torch.zeros(p.shape[1], dtype=p.dtype, device=p.device), column
    sums = fused.change_sums(p, a, d, k1, change.k2, v, k3, c)
    if sums is None:
        return None
    s0, s1, t_max = sums
    kl = (torch.log1p(s1) - s0).to(p.dtype)
    large = t_max.squeeze(-1) > _SAFE_EXPONENT
    if large.any():
        rows = large.nonzero().squeeze(-1)
        c0 = (
            clean.c0
            if clean.c0 is not None
            else torch.zeros(p.shape[1], dtype=p.dtype, device=p.device)
        )
        inv_s = (
            clean.inv_s.clone() if change.k2 is clean.inv_s else clean.inv_s
        )  # after the norm, k2 is 1 / s
        terms = (
            fused.large_rows(rows, p, a, d, k1, change.k2, v, k3, c, inv_s, c0, clean.log_z)
            if fused.large_rows.usable(a)
            else None
        )
        exact = torch.log1p(terms[0]) - s0[rows] if terms is not None else None
        if (
            exact is None or not torch.isfinite(exact).all()
        ):  # past float64's exp too (KL > 700 nats)
            t_rows = a[rows] * k1[rows] - d[rows] * change.k2[rows] + v * k3[rows] - c[rows]
            exact = _large_rows_kl(t_rows, p[rows], s0[rows].to(p.dtype), clean.log_p(rows))
        kl[rows] = exact.to(p.dtype)
    return kl.clamp_min_(0.0)


@dataclass
class _Change:
    """One cell's logit change ``delta = A k1 - (D - alpha) k2 + beta`` per row [N, 1]:
    ``k2 = 1 / sigma``, ``k1 = 1 / sigma - 1 / s`` (None after the norm), ``D`` the removed part
    (``A - R`` where ``complement``); ``base`` is ``E_p[delta]`` but for ``-p.D k2`` and ``top``
    an upper bound of ``max delta`` but for ``-min(D) k2``: the parts that come from ``D``."""

    cell: Cell
    complement: bool
    k1: torch.Tensor | None
    k2: torch.Tensor
    alpha: torch.Tensor | None
    beta: torch.Tensor | None
    base: torch.Tensor
    top: torch.Tensor
    edit: torch.Tensor


def _change_kls(
    a: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor,
    p_a: torch.Tensor,
    changes: list[_Change],
    clean: _Clean,
) -> list[torch.Tensor]:
    """Token KLs [N, 1] of every cell that reads the product ``r``: the removed part ``D``
    (``r``, or ``A - r``) and its dot product with ``p`` once, then per cell the fused sums
    (:func:`_fused_kl`) or, eagerly, ``t = delta - E_p[delta]`` (into reused buffers, with ``D``'s
    row minimum for the overflow bound) and :func:`_kl_from_change`."""
    p_r = row_dot(p, r).unsqueeze(-1)
    removed = {}  # per complement flag: D, p.D
    if any(ch.complement for ch in changes):
        removed[True] = (a - r, p_a - p_r)
    if not all(ch.complement for ch in changes):
        removed[False] = (r, p_r)
    t = scratch = None
    minima: dict[bool, torch.Tensor] = {}  # min D per row: the eager path's overflow bound
    kls = []
    for change in changes:
        d, p_d = removed[change.complement]
        c = change.base - p_d * change.k2  # E_p[delta]
        if fused.change_sums.usable(a):
            kl = _fused_kl(change, a, d, p, c, clean)
            if kl is not None:
                kls.append(kl)
                continue
        if t is None:
            t, scratch = torch.empty_like(a), torch.empty_like(a)
        if change.complement not in minima:
            minima[change.complement] = d.amin(-1, keepdim=True)
        d_min = minima[change.complement]
        if change.k1 is not None:
            torch.addcmul(-c, a, change.k1, out=t)
            t.addcmul_(d, change.k2, value=-1.0)
        else:
            torch.addcmul(-c, d, change.k2, value=-1.0, out=t)
        if change.alpha is not None:
            t.addcmul_(change.alpha, change.k2)
        elif change.beta is not None:
            t.add_(change.beta)
        kls.append(_kl_from_change(t, p, change.top - d_min * change.k2 - c, clean, scratch))
    return kls


@torch.no_grad()
def grid_kls(
    head: LinearHead,
    z: torch.Tensor,
    products: list[_Product],
    ablations: list[_Ablation],
    source: torch.Tensor | None = None,
    on_clean: Callable[[torch.Tensor], None] | None = None,
) -> dict[Cell, tuple[torch.Tensor, torch.Tensor]]:
    """Per cell: token KL(p_lens(z) || p_lens(z_ablated)) and relative edit size, ``z`` [N, d]
    (``source`` [N, d]: the vectors a ``carried`` plan ablates, :meth:`LinearHead.plan`;
    ``on_clean`` is handed the clean logits before they are overwritten and must not change them).

    With ``l = A / s + c0`` the clean logits and ``x = (A - D + alpha) / sigma + c0 + beta`` a
    cell's (``D`` the removed part's numerator: the product ``R``, or ``A - R`` for the
    complement of ``R``'s subspace), the change is formed from small terms only, never as a
    difference of two logit-sized vectors: ``delta = x - l = A (1/sigma - 1/s) - (D - alpha) /
    sigma + beta`` (``1/sigma - 1/s`` from ``sigma^2 - s^2``, :meth:`LinearHead.rescale`; zero
    after the norm). Its KL, ``log E_p[e^delta] - E_p[delta]``, comes from ``delta`` shifted by
    ``E_p[delta]``, which the dot products ``p.A``, ``p.D`` and ``p.alpha`` give
    (:func:`_change_kls`): four to six passes over ``[N, V]`` a cell, no ``[V, d]`` work.
    """
    cz = head.centre(z)
    s = head.scale(cz)
    inv_s = 1 / s
    a = gemm.linear(cz, head.g)  # the clean logits' numerator: logits = A / s + c0
    clean = a * inv_s
    if head.c0 is not None:
        clean.add_(head.c0)
    if head.capped:  # the soft-cap is not linear: every cell's logits are formed and capped
        capped = head.output(clean)
        if on_clean is not None:
            on_clean(capped)
        clean_logp = capped.log_softmax(-1)
        p = clean_logp.exp()
    else:
        if on_clean is not None:
            on_clean(clean)
        log_z = torch.logsumexp(clean, -1, keepdim=True)
        p = clean.sub_(log_z).exp_()
        del clean
        a_min, a_max = torch.aminmax(a, dim=-1, keepdim=True)
        clean_parts = _Clean(a, inv_s, head.c0, log_z)
    p_a = row_dot(p, a).unsqueeze(-1)
    const_keys = [(id(ab), m) for ab in ablations for m in ab.const if ab.const[m] is not None]
    p_const, const_max = {}, {}
    if const_keys:  # p . alpha (or beta) of every mean ablation, in one matrix product
        consts = torch.stack(
            [ab.const[m] for ab in ablations for m in ab.const if ab.const[m] is not None], 1
        )
        dots = p @ consts
        p_const = {key: dots[:, i : i + 1] for i, key in enumerate(const_keys)}
        const_max = dict(zip(const_keys, consts.amax(0)))
    out = {}
    by_product: dict[int, list[_Ablation]] = {}
    for ab in ablations:
        by_product.setdefault(ab.product, []).append(ab)
    before_norm = z if source is None else source
    for index, product in enumerate(products):
        r = gemm.linear(
            (before_norm if product.source == "pre_norm" else cz) @ product.q, product.lin
        )
        changes = []
        for ab in by_product.get(index, []):
            x_site = before_norm if ab.site == "pre_norm" else cz * inv_s
            coeff = x_site @ ab.q
            for cell in ab.cells:
                shift, const = ab.shift[cell.mode], ab.const[cell.mode]
                a_k = coeff - shift if shift is not None else coeff
                edit = a_k.norm(dim=-1) / x_site.norm(dim=-1).clamp_min(1e-30)
                inv_sigma, k1 = (
                    head.rescale(cz, s, a_k @ ab.c_q.T) if ab.site == "pre_norm" else (inv_s, None)
                )
                alpha = const if const is not None and ab.site == "pre_norm" else None
                beta = const if const is not None and ab.site == "post_norm" else None
                if head.capped:
                    num = r if ab.complement else a - r
                    x = (num + alpha) * inv_sigma if alpha is not None else num * inv_sigma
                    for vector in (beta, head.c0):
                        if vector is not None:
                            x = x + vector
                    kl = (p * (clean_logp - head.output(x).log_softmax(-1))).sum(-1)
                    out[cell] = (kl, edit)
                    continue
                base, top = torch.zeros_like(inv_sigma), torch.zeros_like(inv_sigma)
                if k1 is not None:
                    base, top = p_a * k1, torch.where(k1 >= 0, a_max * k1, a_min * k1)
                if const is not None:
                    p_c, c_max = p_const[(id(ab), cell.mode)], const_max[(id(ab), cell.mode)]
                    base = base + (p_c * inv_sigma if alpha is not None else p_c)
                    top = top + (c_max * inv_sigma if alpha is not None else c_max)
                changes.append(
                    _Change(cell, ab.complement, k1, inv_sigma, alpha, beta, base, top, edit)
                )
        if changes:
            for change, kl in zip(changes, _change_kls(a, r, p, p_a, changes, clean_parts)):
                out[change.cell] = (kl.squeeze(-1), change.edit)
        del r
    return out
