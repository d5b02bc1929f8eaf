"""The ablation grid every experiment runs at a layer, and how its cells become rows.

A cell is one (subspace, k, basis, mode, site) and, for the random control, one of several
independent draws. Per cell the experiment records each held-out sequence's mean KL and
the edit's relative size; :class:`CellResults` turns them into the contract's rows (mean,
bootstrap interval over sequences, the random draws' spread) and the per-sequence rows that
paired comparisons are made from.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import product
from typing import NamedTuple

import torch

from lensspace.stats import draw_spread
from lensspace.subspaces import Basis, random_subspace, select


class Cell(NamedTuple):
    """One ablation at one layer; ``draw`` numbers the random control's draws (0 otherwise)."""

    subspace: str
    k: int
    basis: str
    mode: str
    site: str
    draw: int = 0

    @property
    def key(self) -> tuple:
        """The cell without its draw: what one output row describes."""
        return self[:5]


# Random controls: a basis whose operation is not a plain projection gets its own control,
# the same operation on a random subspace (named ``random_<basis>``).
TRANSPORTED = ("lens_pullback",)


@dataclass(frozen=True)
class AblationGrid:
    """The variants run at each layer; the random control is drawn ``random_draws`` times."""

    subspaces: tuple[str, ...] = ("output", "internal", "random")
    ks: tuple[int | str, ...] = ("half",)
    bases: tuple[str, ...] = ("unembed", "unembed_centered")
    modes: tuple[str, ...] = ("zero", "mean")
    sites: tuple[str, ...] = ("pre_norm", "post_norm")
    seed: int = 0
    n_boot: int = 1000
    random_draws: int = 4
    experiment: str = "h0"

    def resolve_k(self, d_model: int) -> list[int]:
        """Subspace sizes: integers as given, ``half`` = d_model // 2, ``quarter`` = d_model //
        4."""
        named = {"half": d_model // 2, "quarter": d_model // 4}
        return sorted({named[k] if isinstance(k, str) else int(k) for k in self.ks})

    def random_bases(self) -> tuple[str, ...]:
        """``random`` (a random subspace of the ablated space), plus ``random_<basis>`` for
        every transported basis of the grid."""
        return ("random", *(f"random_{b}" for b in self.bases if b in TRANSPORTED))

    def variants(self, d_model: int) -> list[Cell]:
        """Every cell at one layer; random cells carry a control basis and a draw number."""
        cells = []
        for subspace, k, mode, site in product(
            self.subspaces, self.resolve_k(d_model), self.modes, self.sites
        ):
            if subspace == "random":
                cells += [
                    Cell(subspace, k, basis, mode, site, draw)
                    for basis in self.random_bases()
                    for draw in range(self.random_draws)
                ]
            else:
                cells += [Cell(subspace, k, basis, mode, site) for basis in self.bases]
        return cells

    def random_seed(self, layer: int, k: int, basis: str, draw: int) -> int:
        """A seed for one random draw, different across experiments, layers, sizes and draws."""
        text = f"{self.seed}/{self.experiment}/{layer}/{k}/{basis}/{draw}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


def subspace_basis(
    bases: dict[str, Basis],
    grid: AblationGrid,
    layer: int,
    subspace: str,
    k: int,
    basis: str,
    draw: int = 0,
) -> torch.Tensor:
    """The [d, k] orthonormal basis of one cell (random: its own seeded draw)."""
    if subspace == "random":
        vectors = next(iter(bases.values())).vectors
        return random_subspace(
            vectors.shape[0], k, grid.random_seed(layer, k, basis, draw), vectors.device
        )
    return select(bases[basis].vectors, subspace, k)


class CellResults:
    """Per-sequence KLs [n_sequences] and mean relative edit sizes of every cell at a layer."""

    def __init__(self, layer: int, grid: AblationGrid):
        self.layer, self.grid = layer, grid
        self.kl: dict[Cell, list[torch.Tensor]] = {}
        self.edit: dict[Cell, list[torch.Tensor]] = {}

    def add(self, cell: Cell, kl: torch.Tensor, edit_rel: torch.Tensor) -> None:
        """A chunk of sequences: token KLs [n, T] and per-token ``||x' - x|| / ||x||`` [n, T]."""
        self.kl.setdefault(cell, []).append(kl.double().cpu())
        self.edit.setdefault(cell, []).append(edit_rel.double().cpu())

    def per_sequence(self) -> list[dict]:
        """One row per cell, draw and held-out sequence: the sequence's mean KL."""
        rows = []
        for cell, parts in self.kl.items():
            for sequence, kl in enumerate(torch.cat(parts).mean(1).tolist()):
                rows.append({"layer": self.layer, **cell._asdict(), "sequence": sequence, "kl": kl})
        return rows

    def rows(self) -> list[dict]:
        """One contract row per cell (draws pooled): mean KL with its interval over sequences,
        the draws' spread of their means, and the mean relative edit size."""
        grouped: dict[tuple, list[Cell]] = {}
        for cell in self.kl:
            grouped.setdefault(cell.key, []).append(cell)
        rows = []
        for key, cells in grouped.items():
            values = torch.stack([torch.cat(self.kl[c]) for c in cells])  # [draws, n_seq, T]
            spread = draw_spread(values, n_boot=self.grid.n_boot, seed=self.grid.seed)
            est = spread.estimate
            edit = float(torch.stack([torch.cat(self.edit[c]) for c in cells]).mean())
            subspace, k, basis, mode, site = key
            rows.append(
                {
                    "layer": self.layer,
                    "subspace": subspace,
                    "k": k,
                    "basis": basis,
                    "mode": mode,
                    "site": site,
                    "kl": est.mean,
                    "kl_lo": est.lo,
                    "kl_hi": est.hi,
                    "n_tokens": est.n_tokens,
                    "n_draws": spread.n_draws,
                    "draw_sd": spread.draw_sd,
                    "draw_min": spread.draw_min,
                    "draw_max": spread.draw_max,
                    "edit_rel": edit,
                }
            )
        return rows


def relative_edit(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``||after - before|| / ||before||`` per vector (last axis)."""
    return (after.double() - before.double()).norm(dim=-1) / before.double().norm(dim=-1).clamp_min(
        1e-30
    )
