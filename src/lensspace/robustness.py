"""How each conclusion of an ablation experiment moves with its variants and controls.

A conclusion "A > B" (ablating A raises the KL more than ablating B) is judged per cell
(layer, k, basis, mode, site) from the per-sequence KLs (``per_sequence.tsv``): a paired
bootstrap of the per-sequence difference A - B on the same held-out sequences gives the
mean difference, its 95% interval and a two-sided p-value; the p-values of every comparison
of the experiment's grid (one run) form one family, corrected by Holm's step-down method, so a
verdict holds at family-wise error 0.05 over the whole grid. Against the random control,
whose KL is the mean over its independent draws, the verdict also needs the other side to
lie beyond the draws' range (above the largest draw, or below the smallest):

- ``holds``: adjusted p < 0.05, A - B > 0 (and beyond the draws' range);
- ``reversed``: adjusted p < 0.05, A - B < 0 (and beyond the draws' range the other way);
- ``not separable``: anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from lensspace.errors import LensspaceError
from lensspace.stats import adjust, paired_difference

HOLDS, REVERSED, NOT_SEPARABLE = "holds", "reversed", "not separable"
VERDICTS = (HOLDS, REVERSED, NOT_SEPARABLE)
SYMBOL = {HOLDS: "✓", REVERSED: "✗", NOT_SEPARABLE: "·"}
CELL = ["layer", "k", "mode", "site"]
VARIANT = ["basis", "mode", "site", "k"]
REQUIRED = {"layer", "subspace", "k", "basis", "mode", "site", "draw", "sequence", "kl"}
ALPHA = 0.05
CORRECTION = "holm"
PROCEDURE = (
    "paired bootstrap of the per-sequence difference (studentized), two-sided, Holm-corrected "
    "over every comparison of the grid; against the random control also beyond the range "
    "of its draws"
)
COLUMNS = [
    "conclusion",
    *VARIANT,
    "layer",
    "verdict",
    "kl_a",
    "kl_b",
    "diff",
    "diff_lo",
    "diff_hi",
    "p_value",
    "p_adjusted",
    "draw_min",
    "draw_max",
    "n_draws",
    "n_sequences",
]


@dataclass(frozen=True)
class Conclusion:
    """``stronger`` ablation hurts more (higher KL) than ``weaker``."""

    stronger: str
    weaker: str

    @property
    def label(self) -> str:
        return f"{self.stronger} > {self.weaker}"


CONCLUSIONS = (
    Conclusion("output", "internal"),  # the study's claim
    Conclusion("output", "random"),  # the output subspace matters more than any k directions
    Conclusion("random", "internal"),  # the internal subspace matters less than any k directions
)


def control_basis(basis: str, available: set[str]) -> str:
    """The random control of a basis: ``random_<basis>`` where the grid has one, else ``random``."""
    own = f"random_{basis}"
    return own if own in available else "random"


def _vectors(per_sequence: pd.DataFrame) -> dict[tuple, torch.Tensor]:
    """(subspace, basis, layer, k, mode, site) -> KLs [n_draws, n_sequences]."""
    out = {}
    keys = ["subspace", "basis", *CELL]
    for key, part in per_sequence.groupby(keys, sort=False):
        wide = part.pivot(index="draw", columns="sequence", values="kl").sort_index()
        out[key] = torch.tensor(wide.to_numpy(), dtype=torch.float64)
    return out


def compare(
    per_sequence: pd.DataFrame, n_boot: int = 20000, seed: int = 0, conclusions=CONCLUSIONS
) -> pd.DataFrame:
    """One row per conclusion x variant x layer with the paired comparison and its verdict
    (columns :data:`COLUMNS`). Conclusions whose subspaces are absent are skipped."""
    missing = REQUIRED - set(per_sequence.columns)
    if missing:
        raise LensspaceError(
            f"a per-sequence table needs the columns {sorted(REQUIRED)}; missing: {sorted(missing)}"
        )
    vectors = _vectors(per_sequence)
    random_bases = {b for s, b, *_ in vectors if s == "random"}
    pairs = []
    for conclusion in conclusions:
        a, b = conclusion.stronger, conclusion.weaker
        if a == b == "random":
            continue
        fixed = a if a != "random" else b
        for (subspace, basis, *cell), values in vectors.items():
            if subspace != fixed:
                continue
            other_basis = control_basis(basis, random_bases) if "random" in (a, b) else basis
            other = vectors.get(((b if fixed == a else a), other_basis, *cell))
            if other is None:
                continue
            side_a, side_b = (values, other) if fixed == a else (other, values)
            pairs.append((conclusion, basis, cell, side_a, side_b))
    if not pairs:
        return pd.DataFrame(columns=COLUMNS)
    # the smallest p-value a bootstrap test can give is 2 / (n_boot + 1): keep it at most a
    # quarter of Holm's first threshold ALPHA / m, so that a clear effect can pass the correction
    n_boot = max(n_boot, int(8 * len(pairs) / ALPHA))
    out = pd.DataFrame([_row(*pair, n_boot, seed) for pair in pairs])
    out["p_adjusted"] = adjust(out["p_value"].tolist(), CORRECTION)
    out["verdict"] = [_verdict(r) for r in out.to_dict("records")]
    order = {c.label: i for i, c in enumerate(conclusions)}
    out = out.sort_values(
        ["conclusion", *VARIANT, "layer"],
        key=lambda s: s.map(order) if s.name == "conclusion" else s,
    )
    return out[COLUMNS].reset_index(drop=True)


def _row(
    conclusion: Conclusion,
    basis: str,
    cell: list,
    a: torch.Tensor,
    b: torch.Tensor,
    n_boot: int,
    seed: int,
) -> dict:
    """The paired comparison of A and B (each [n_draws, n_sequences]; draws averaged)."""
    comparison = paired_difference(a.mean(0), b.mean(0), n_boot=n_boot, seed=seed)
    draws = a if conclusion.stronger == "random" else b if conclusion.weaker == "random" else None
    draw_means = draws.mean(1) if draws is not None else None
    layer, k, mode, site = cell
    return {
        "conclusion": conclusion.label,
        "basis": basis,
        "mode": mode,
        "site": site,
        "k": k,
        "layer": layer,
        "kl_a": float(a.mean()),
        "kl_b": float(b.mean()),
        "diff": comparison.diff,
        "diff_lo": comparison.lo,
        "diff_hi": comparison.hi,
        "p_value": comparison.p_value,
        "draw_min": float(draw_means.min()) if draw_means is not None else float("nan"),
        "draw_max": float(draw_means.max()) if draw_means is not None else float("nan"),
        "n_draws": len(draws) if draws is not None else 0,
        "n_sequences": a.shape[1],
        "_random_side": "a"
        if conclusion.stronger == "random"
        else "b"
        if draws is not None
        else "",
    }


def _verdict(row: dict) -> str:
    side = row.pop("_random_side")
    if side == "b":  # A > random: A must clear the draws' range
        return verdict(
            row["diff"], row["p_adjusted"], row["kl_a"], row["draw_min"], row["draw_max"]
        )
    if side == "a":  # random > B: B must clear the draws' range (below the smallest for "holds")
        return verdict(
            row["diff"], row["p_adjusted"], -row["kl_b"], -row["draw_max"], -row["draw_min"]
        )
    return verdict(row["diff"], row["p_adjusted"])


def verdict(
    diff: float,
    p_adjusted: float,
    value: float | None = None,
    draw_min: float | None = None,
    draw_max: float | None = None,
) -> str:
    """``holds`` / ``reversed`` / ``not separable`` for a paired difference A - B with its adjusted
    p-value; where B is random draws, A's ``value`` must also lie above (below) all of them."""
    above = below = True
    if value is not None:
        above, below = value > draw_max, value < draw_min
    if p_adjusted < ALPHA and diff > 0 and above:
        return HOLDS
    if p_adjusted < ALPHA and diff < 0 and below:
        return REVERSED
    return NOT_SEPARABLE


def grid(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Rows conclusion x variant (basis, mode, site, k), one column per layer, verdict cells."""
    if verdicts.empty:
        return pd.DataFrame(columns=["conclusion", *VARIANT])
    order = list(dict.fromkeys(verdicts["conclusion"]))
    wide = verdicts.pivot_table(
        index=["conclusion", *VARIANT], columns="layer", values="verdict", aggfunc="first"
    ).reset_index()
    wide["_order"] = wide["conclusion"].map(order.index)
    wide = wide.sort_values(["_order", *VARIANT]).drop(columns="_order").reset_index(drop=True)
    wide.columns.name = None
    return wide


def summary(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Per conclusion: how many cells hold, are reversed, are not separable, of how many."""
    rows = []
    for label, part in verdicts.groupby("conclusion", sort=False):
        counts = part["verdict"].value_counts()
        rows.append(
            {
                "conclusion": label,
                **{v: int(counts.get(v, 0)) for v in VERDICTS},
                "cells": len(part),
            }
        )
    return pd.DataFrame(rows, columns=["conclusion", *VERDICTS, "cells"])


def legend(verdicts: pd.DataFrame) -> str:
    """What a symbol means, with the procedure and the size of the corrected family."""
    draws = verdicts.loc[verdicts["n_draws"] > 0, "n_draws"]
    n_draws = f"{int(draws.max())} " if len(draws) else ""
    return (
        f"{SYMBOL[HOLDS]} holds, {SYMBOL[REVERSED]} reversed, {SYMBOL[NOT_SEPARABLE]} not "
        f"separable. Procedure: {PROCEDURE}; family: the {len(verdicts)} comparisons of this "
        f"grid, family-wise error {ALPHA}; random control: the mean of {n_draws}independent "
        "draws, and the other side must lie beyond their range. Blank: no such cell."
    )


def markdown_grid(verdicts: pd.DataFrame) -> str:
    """The grid as Markdown, verdicts as symbols, with a legend and the per-conclusion counts."""
    wide = grid(verdicts)
    layers = [c for c in wide.columns if c not in ("conclusion", *VARIANT)]
    header = (
        "| conclusion | basis | mode | site | k | "
        + " | ".join(f"L{layer}" for layer in layers)
        + " |"
    )
    rule = "|---|---|---|---|---:|" + "|".join(":---:" for _ in layers) + "|"
    body = [
        "| "
        + " | ".join(
            [
                str(row["conclusion"]),
                str(row["basis"]),
                str(row["mode"]),
                str(row["site"]),
                str(row["k"]),
                *(SYMBOL.get(row[layer], "") for layer in layers),
            ]
        )
        + " |"
        for _, row in wide.iterrows()
    ]
    counts = summary(verdicts)
    lines = [
        f"- {r['conclusion']}: holds in {r[HOLDS]} of {r['cells']} cells, reversed in "
        f"{r[REVERSED]}, not separable in {r[NOT_SEPARABLE]}"
        for r in counts.to_dict("records")
    ]
    return (
        "\n".join([header, rule, *body])
        + "\n\n"
        + legend(verdicts)
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )
