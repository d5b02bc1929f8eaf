"""H1: SVD subspaces ablated in the model's own residual stream, and the circuit ends (each
head's and MLP's lens-space write)."""

from __future__ import annotations

import pandas as pd

from lensspace.report import words
from lensspace.report.ablation import AblationExperiment
from lensspace.report.blocks import Table
from lensspace.report.sections import Context, existing


def pullback(run: str, files: dict, context: Context, ablation: pd.DataFrame) -> list:
    """The lens pull-back's KL beside the size of the residual edit it needs."""
    pulled = ablation[ablation["basis"].isin(["lens_pullback", "random_lens_pullback"])]
    if pulled.empty or "edit_rel" not in pulled:
        return []
    mode = "zero" if "zero" in set(pulled["mode"]) else pulled["mode"].iloc[0]
    k = int(pulled["k"].max())
    cell = pulled[(pulled["mode"] == mode) & (pulled["k"] == k)]
    wide = cell.pivot(index="layer", columns="subspace", values=["kl", "edit_rel"])
    table = pd.DataFrame({"layer": wide.index})
    for subspace in ("output", "internal", "random"):
        if ("kl", subspace) in wide:
            table[f"KL {subspace}"] = wide[("kl", subspace)].to_numpy()
            table[f"edit {subspace}"] = wide[("edit_rel", subspace)].to_numpy()
    return [
        Table(
            table,
            (
                f"Lens-space ablation carried into the residual stream, {run} ({mode} mode, "
                f"k = {k}): KL(p_model ‖ p_ablated) of the final output beside the edit's "
                "relative size ||h' − h|| / ||h|| (mean over tokens). The edit satisfies "
                "T_i(h') = ablate(T_i(h)) exactly; where I + A_i is ill-conditioned it can be "
                "much larger than h itself, and the KL then measures a large residual edit as "
                "much as the lens-space removal. Random: the same operation on random lens-space "
                "subspaces (mean of the draws)."
            ),
        )
    ]


def circuit_ends(run: str, files: dict, context: Context, ablation: pd.DataFrame) -> list:
    """The permutation test of the induction heads' lens-space output share, as a finding."""
    path = existing(files.get("heads_test"))
    if path is None:
        return []
    test = pd.read_csv(path, sep="\t").iloc[0]
    if pd.isna(test.get("statistic")):
        return []
    interval = (
        f" (95% interval {words.number(test['effect_lo'])} to {words.number(test['effect_hi'])})"
        if "effect_lo" in test and pd.notna(test["effect_lo"])
        else ""
    )
    return [
        f"Circuit ends: induction heads' lens-space output share minus that of other heads "
        f"of the same layer {words.number(test['statistic'])}{interval}, permutation p = "
        f"{words.number(test['p_value'])} over {int(test['n_compared'])} induction heads."
    ]


H1 = AblationExperiment(
    "h1",
    "H1: SVD subspaces ablated in the residual stream",
    where="in the model's own residual stream h_i, after which the remaining blocks run",
    measure="KL(p_model ‖ p_model ablated) of the final output",
    site="residual",
    summary=pullback,
    more_findings=circuit_ends,
    extra_figures=(
        (
            "heads_figure",
            "Circuit ends: each attention head's induction score against the "
            "lens-space share of its write in the output subspace: the write w of block i is "
            "carried by the translator of the residual it lands in, M = I + A_{i+1} (M = I after "
            "the last block), and the share is Σ‖Qᵀ M w‖² / Σ‖M w‖² over held-out tokens.",
        ),
    ),
    extra_tables=(
        (
            "heads_test",
            "Circuit ends, permutation test within layers: do induction heads write a "
            "larger lens-space share into the output subspace than the other heads of their own "
            "layer? Effect (statistic): mean over induction heads of (share − mean share of the "
            "other heads of their layer), with a 95% bootstrap interval (effect_lo, effect_hi); "
            "p-value from permuting the induction flags among the heads of each layer, over the "
            "n_layers layers that hold both kinds.",
            False,
        ),
        (
            "mlp",
            "MLPs: the lens-space share of each block's MLP write in the output and internal "
            "subspaces; write_norm and lens_write_norm give its RMS size before and after the "
            "translator.",
            True,
        ),
        (
            "heads",
            "Attention heads: induction score and the lens-space share of each head's write "
            "in the output and internal subspaces (with the write's RMS size before and after the "
            "translator).",
            True,
        ),
    ),
)
section = H1.section
finding = H1.finding
