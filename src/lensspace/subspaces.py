"""SVD bases of the unembedding, subspaces drawn from them, and ablations of a subspace.

A basis is a [d, d] matrix whose columns are right singular vectors in descending order of
singular value: the first ``k`` span the *output* subspace, the last ``k`` the *internal* one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lensspace.adapter import Adapter
from lensspace.devices import move
from lensspace.errors import LensspaceError

Subspace = Literal["output", "internal", "random"]
Mode = Literal["zero", "mean"]


@dataclass(frozen=True)
class Basis:
    """Right singular vectors (columns, descending) and their singular values."""

    name: str
    vectors: torch.Tensor
    singular_values: torch.Tensor


def unembedding_bases(adapter: Adapter) -> dict[str, Basis]:
    """``unembed``: SVD of raw ``W_U``. ``unembed_centered``: of ``(W_U - mean) diag(g)``.

    Centring removes the one direction softmax ignores (adding a constant to every logit);
    folding the final norm's gain in makes the basis act on the normalised residual.
    """
    w = adapter.unembedding.detach().double()
    centered = (w - w.mean(0, keepdim=True)) * adapter.norm_gain.detach().double()
    return {
        "unembed": _svd_basis("unembed", w),
        "unembed_centered": _svd_basis("unembed_centered", centered),
    }


def _svd_basis(name: str, w: torch.Tensor) -> Basis:
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    return Basis(name, vh.T.float().contiguous(), s.float())


def select(basis: torch.Tensor, subspace: Subspace, k: int, seed: int = 0) -> torch.Tensor:
    """An orthonormal [d, k] basis of the output (top-k), internal (bottom-k) or random subspace."""
    d = basis.shape[0]
    if not 1 <= k <= d:
        raise LensspaceError(f"k={k} must lie in 1..{d} (d_model)")
    if subspace == "output":
        return basis[:, :k]
    if subspace == "internal":
        return basis[:, d - k :]
    if subspace == "random":
        return random_subspace(d, k, seed)
    raise LensspaceError(f"unknown subspace '{subspace}': use output, internal or random")


def random_subspace(d: int, k: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A seeded, uniformly random k-dim subspace (QR of a Gaussian matrix, sign-fixed), drawn
    on the CPU and then moved to ``device``: every device gets the same subspace."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return move(q.float().contiguous(), device)


def project(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of ``x`` (rows) onto span(q), q orthonormal [d, k]."""
    return (x @ q) @ q.T


def ablate(
    x: torch.Tensor, q: torch.Tensor, mode: Mode, mean: torch.Tensor | None = None
) -> torch.Tensor:
    """Remove span(q) from ``x`` (zero) or replace its component by that of ``mean`` (mean)."""
    if mode == "zero":
        return x - project(x, q)
    if mode == "mean":
        if mean is None:
            raise LensspaceError("mean ablation needs the dataset mean")
        return x - project(x - mean, q)
    raise LensspaceError(f"unknown ablation mode '{mode}': use zero or mean")


def save_bases(bases: dict[str, Basis], path: str) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, basis in bases.items():
        tensors[f"{name}.vectors"] = basis.vectors
        tensors[f"{name}.singular_values"] = basis.singular_values
    save_file(tensors, path)


def load_bases(path: str, device: torch.device | str = "cpu") -> dict[str, Basis]:
    """The bases :func:`save_bases` wrote, on ``device``."""
    from safetensors.torch import load_file

    tensors = {key: move(t, device) for key, t in load_file(path).items()}
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {n: Basis(n, tensors[f"{n}.vectors"], tensors[f"{n}.singular_values"]) for n in names}


def orthonormal_basis(vectors: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis [d, r] of the column span of ``vectors`` [d, m] (rank-revealing SVD)."""
    u, s, _ = torch.linalg.svd(vectors.double(), full_matrices=False)
    rank = int((s > rtol * s[0]).sum())
    return u[:, :rank].float().contiguous()


class LensPullback:
    """A lens-space ablation carried exactly into the residual stream through translator ``i``.

    With ``z = T_i(h) = M h + b`` (``M = I + A_i``), the edit
    ``h' = h - M^-1 Q Q^T (M h + b - c)`` gives ``T_i(h') = z - Q Q^T (z - c)``: exactly the
    lens-space ablation of span(Q) (``c = 0``: zero; ``c`` = the training mean of ``z``: mean).
    Computed in float64, since ``M`` can be ill-conditioned; the edit can then be large,
    which is why callers report its size.
    """

    def __init__(
        self, translator_weight: torch.Tensor, translator_bias: torch.Tensor, q: torch.Tensor
    ):
        self.m = (
            torch.eye(q.shape[0], dtype=torch.float64, device=q.device) + translator_weight.double()
        )
        self.b = translator_bias.double()
        self.q = q.double()
        self.m_inv_q = torch.linalg.solve(self.m, self.q)  # [d, k]

    def apply(
        self, h: torch.Tensor, mode: Mode, z_mean: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``h'`` for residuals ``h`` [..., d] (zero mode, or mean mode with ``z_mean``)."""
        z = h.double() @ self.m.T + self.b
        if mode == "mean":
            if z_mean is None:
                raise LensspaceError("mean ablation needs the dataset mean of z")
            z = z - z_mean.double()
        elif mode != "zero":
            raise LensspaceError(f"unknown ablation mode '{mode}': use zero or mean")
        return (h.double() - (z @ self.q) @ self.m_inv_q.T).to(h.dtype)
