"""How each conclusion of an ablation experiment moves with its variants and controls.

Works on any table with the ablation columns of the output contract (layer, subspace, k,
basis, mode, site, kl, kl_lo, kl_hi, n_tokens): H0 and H1 alike. A conclusion "A hurts more
than B" is judged per cell (layer, k, basis, mode, site) from the two 95% intervals:

- ``holds``: A's interval lies wholly above B's;
- ``reversed``: B's interval lies wholly above A's;
- ``not separable``: the intervals overlap.

The random control has basis ``random``; it is compared with each basis at the same layer,
k, mode and site.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from lensspace.errors import LensspaceError

HOLDS, REVERSED, NOT_SEPARABLE = "holds", "reversed", "not separable"
VERDICTS = (HOLDS, REVERSED, NOT_SEPARABLE)
SYMBOL = {HOLDS: "✓", REVERSED: "✗", NOT_SEPARABLE: "·"}
CELL = ["layer", "k", "mode", "site"]
VARIANT = ["basis", "mode", "site", "k"]
REQUIRED = {"layer", "subspace", "k", "basis", "mode", "site", "kl", "kl_lo", "kl_hi"}


@dataclass(frozen=True)
class Conclusion:
    """``stronger`` ablation hurts more (higher KL) than ``weaker``."""

    stronger: str
    weaker: str

    @property
    def label(self) -> str:
        return f"{self.stronger} > {self.weaker}"


CONCLUSIONS = (
    Conclusion("output", "internal"),   # the study's claim
    Conclusion("output", "random"),     # the output subspace matters more than any k directions
    Conclusion("random", "internal"),   # the internal subspace matters less than any k directions
)


def verdict(a_lo: float, a_hi: float, b_lo: float, b_hi: float) -> str:
    """Whether A > B by non-overlapping intervals, B > A, or neither."""
    if a_lo > b_hi:
        return HOLDS
    if b_lo > a_hi:
        return REVERSED
    return NOT_SEPARABLE


def _side(ablation: pd.DataFrame, subspace: str) -> pd.DataFrame:
    rows = ablation[ablation["subspace"] == subspace]
    if subspace == "random":
        return rows[[*CELL, "kl", "kl_lo", "kl_hi"]].drop_duplicates(CELL)
    return rows[[*CELL, "basis", "kl", "kl_lo", "kl_hi"]]


def classify(ablation: pd.DataFrame, conclusions=CONCLUSIONS) -> pd.DataFrame:
    """One row per conclusion x variant x layer: conclusion, basis, mode, site, k, layer,
    verdict, kl_a, kl_b (the two means). Conclusions whose subspaces are absent are skipped."""
    missing = REQUIRED - set(ablation.columns)
    if missing:
        raise LensspaceError(f"an ablation table needs the columns {sorted(REQUIRED)}; "
                             f"missing: {sorted(missing)}")
    present = set(ablation["subspace"])
    parts = []
    for conclusion in conclusions:
        a, b = conclusion.stronger, conclusion.weaker
        if a not in present or b not in present or a == b == "random":
            continue
        keys = CELL if "random" in (a, b) else [*CELL, "basis"]
        both = _side(ablation, a).merge(_side(ablation, b), on=keys, suffixes=("_a", "_b"))
        if both.empty:
            continue
        both["verdict"] = [verdict(*v) for v in
                           zip(both["kl_lo_a"], both["kl_hi_a"], both["kl_lo_b"], both["kl_hi_b"])]
        both["conclusion"] = conclusion.label
        parts.append(both[["conclusion", *VARIANT, "layer", "verdict", "kl_a", "kl_b"]])
    columns = ["conclusion", *VARIANT, "layer", "verdict", "kl_a", "kl_b"]
    if not parts:
        return pd.DataFrame(columns=columns)
    order = {c.label: i for i, c in enumerate(conclusions)}
    out = pd.concat(parts, ignore_index=True)
    out = out.sort_values(["conclusion", *VARIANT, "layer"],
                          key=lambda s: s.map(order) if s.name == "conclusion" else s)
    return out.reset_index(drop=True)


def grid(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Rows conclusion x variant (basis, mode, site, k), one column per layer, verdict cells."""
    if verdicts.empty:
        return pd.DataFrame(columns=["conclusion", *VARIANT])
    order = list(dict.fromkeys(verdicts["conclusion"]))
    wide = verdicts.pivot_table(index=["conclusion", *VARIANT], columns="layer", values="verdict",
                                aggfunc="first").reset_index()
    wide["_order"] = wide["conclusion"].map(order.index)
    wide = wide.sort_values(["_order", *VARIANT]).drop(columns="_order").reset_index(drop=True)
    wide.columns.name = None
    return wide


def summary(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Per conclusion: how many cells hold, are reversed, are not separable, of how many."""
    rows = []
    for label, part in verdicts.groupby("conclusion", sort=False):
        counts = part["verdict"].value_counts()
        rows.append({"conclusion": label, **{v: int(counts.get(v, 0)) for v in VERDICTS},
                     "cells": len(part)})
    return pd.DataFrame(rows, columns=["conclusion", *VERDICTS, "cells"])


def markdown_grid(verdicts: pd.DataFrame) -> str:
    """The grid as Markdown, verdicts as symbols, with a legend and the per-conclusion counts."""
    wide = grid(verdicts)
    layers = [c for c in wide.columns if c not in ("conclusion", *VARIANT)]
    header = "| conclusion | basis | mode | site | k | " + " | ".join(f"L{layer}" for layer in layers) + " |"
    rule = "|---|---|---|---|---:|" + "|".join(":---:" for _ in layers) + "|"
    body = ["| " + " | ".join([str(row["conclusion"]), str(row["basis"]), str(row["mode"]),
                               str(row["site"]), str(row["k"]),
                               *(SYMBOL.get(row[layer], "") for layer in layers)]) + " |"
            for _, row in wide.iterrows()]
    legend = (f"{SYMBOL[HOLDS]} holds (the first ablation's 95% interval lies above the second's), "
              f"{SYMBOL[REVERSED]} reversed, {SYMBOL[NOT_SEPARABLE]} not separable "
              "(the intervals overlap); blank: no such cell.")
    counts = summary(verdicts)
    lines = [f"- {r['conclusion']}: holds in {r[HOLDS]} of {r['cells']} cells, reversed in "
             f"{r[REVERSED]}, not separable in {r[NOT_SEPARABLE]}" for r in counts.to_dict("records")]
    return "\n".join([header, rule, *body]) + "\n\n" + legend + "\n\n" + "\n".join(lines) + "\n"
