"""The original study's tables (H0.1, H0.2, H1.1 layout), rebuilt from the result TSVs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lensspace.errors import LensspaceError

# The cell of the grid that the original tables used (k = d/2 and the site are the caller's).
SEED_VARIANT = {"basis": "unembed", "mode": "zero"}


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; floats to ``digits`` decimals, missing as blank."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.{digits}f}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---:" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def document(title: str, legend: str, frame: pd.DataFrame, digits: int = 3) -> str:
    """A Markdown page: a heading, the paragraph that says what the numbers are, the table."""
    return f"# {title}\n\n{legend}\n\n{markdown(frame, digits)}\n"


def load_reference(path: str | Path, table: str) -> pd.DataFrame:
    """One published table (``H0.1``, ``H0.2``, ``H1.1``) of the seed study, by layer."""
    ref = pd.read_csv(path, sep="\t", comment="#")
    picked = ref[ref["table"] == table]
    if picked.empty:
        raise LensspaceError(
            f"reference table '{table}' is not in {path} "
            f"(has: {', '.join(sorted(ref['table'].unique()))})"
        )
    return picked.set_index("layer")[["kl_ablate_internal", "kl_ablate_output"]]


def seed_layout(
    ablation: pd.DataFrame, k: int, site: str = "pre_norm", reference: pd.DataFrame | None = None
) -> pd.DataFrame:
    """``layer | KL ablate internal | KL ablate output`` for the seed's variant at ``k``, ``site``.

    Intervals follow as extra columns, then the same cells under mean ablation where the grid
    has them; with ``reference`` the published numbers and the differences
    (reproduced - published) follow too.
    """
    cell = ablation[
        (ablation["k"] == k)
        & (ablation["basis"] == SEED_VARIANT["basis"])
        & (ablation["mode"] == SEED_VARIANT["mode"])
        & (ablation["site"] == site)
    ]
    if cell.empty:
        raise LensspaceError(
            f"the ablation results have no cell k={k}, basis unembed, mode zero, site {site}: "
            "keep those values in the experiment's grid to rebuild the original table"
        )
    wide = cell.pivot(index="layer", columns="subspace", values=["kl", "kl_lo", "kl_hi"])
    out = pd.DataFrame(
        {
            "layer": wide.index,
            "KL ablate internal": wide[("kl", "internal")].to_numpy(),
            "KL ablate output": wide[("kl", "output")].to_numpy(),
            "internal 95% CI": [
                f"[{lo:.3f}, {hi:.3f}]"
                for lo, hi in zip(wide[("kl_lo", "internal")], wide[("kl_hi", "internal")])
            ],
            "output 95% CI": [
                f"[{lo:.3f}, {hi:.3f}]"
                for lo, hi in zip(wide[("kl_lo", "output")], wide[("kl_hi", "output")])
            ],
        }
    )
    mean = ablation[
        (ablation["k"] == k)
        & (ablation["basis"] == SEED_VARIANT["basis"])
        & (ablation["mode"] == "mean")
        & (ablation["site"] == site)
    ]
    if not mean.empty:  # zero ablation also removes the constant part: mean ablation beside it
        by_layer = mean.pivot(index="layer", columns="subspace", values="kl").reindex(out["layer"])
        for subspace in ("internal", "output"):
            if subspace in by_layer:
                out[f"{subspace}, mean ablation"] = by_layer[subspace].to_numpy()
    if reference is not None:
        ref = reference.reindex(out["layer"])
        out["published internal"] = ref["kl_ablate_internal"].to_numpy()
        out["published output"] = ref["kl_ablate_output"].to_numpy()
        out["Δ internal"] = out["KL ablate internal"] - out["published internal"]
        out["Δ output"] = out["KL ablate output"] - out["published output"]
    return out


def embedding_lens_table(fit: pd.DataFrame, ablation: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Per layer: R², route KLs, and the zero-ablation KLs at the smallest k; returns (table, k)."""
    k = int(ablation["k"].min())
    mode = "zero" if "zero" in set(ablation["mode"]) else ablation["mode"].iloc[0]
    cell = ablation[(ablation["k"] == k) & (ablation["mode"] == mode)]
    wide = cell.pivot(index="layer", columns="subspace", values="kl")
    out = fit.set_index("layer")[["r2", "kl_lens_route", "kl_downstream_route"]].rename(
        columns={
            "r2": "R²",
            "kl_lens_route": "KL lens route",
            "kl_downstream_route": "KL downstream route",
        }
    )
    names = {
        "output": "KL ablate input (top-k)",
        "internal": "KL ablate bottom-k",
        "random": "KL ablate random",
    }
    for subspace, label in names.items():
        if subspace in wide:
            out[label] = wide[subspace]
    return out.reset_index(), k
