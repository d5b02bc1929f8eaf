"""H0: SVD subspaces of the unembedding ablated in lens space."""

from __future__ import annotations

import pandas as pd

from lensspace.report.ablation import AblationExperiment
from lensspace.report.blocks import Table, Text
from lensspace.report.sections import Context, existing


def shares(run: str, files: dict, context: Context, ablation: pd.DataFrame) -> list:
    """Why zero and mean ablation disagree: each subspace's share of the lens vectors' squared
    norm, split into its constant and token-varying parts (the ``shares`` file)."""
    path = existing(files.get("shares"))
    if path is None:
        return []
    frame = pd.read_csv(path, sep="\t")
    cell = frame[
        (frame["basis"] == "unembed")
        & (frame["site"] == "pre_norm")
        & (frame["k"] == frame["k"].max())
    ]
    if cell.empty:
        return []
    wide = cell.pivot(index="layer", columns="subspace", values=["constant_share", "varying_share"])
    table = pd.DataFrame({"layer": wide.index})
    for subspace in ("output", "internal"):
        for part in ("constant", "varying"):
            table[f"{subspace} {part} %"] = 100 * wide[(f"{part}_share", subspace)].to_numpy()
    top = cell.loc[cell["constant_share"].idxmax()]
    text = (
        f"Zero against mean ablation, {run}: zero ablation removes a subspace's whole component, "
        "mean ablation only its token-varying part. At layer "
        f"{int(top['layer'])} the {top['subspace']} subspace (basis unembed, k = "
        f"{int(top['k'])}) holds {100 * top['share']:.0f}% of the lens vectors' squared norm "
        f"before the final norm, {100 * top['constant_share']:.0f}% of it constant across tokens "
        f"(|Q^T mean| = {top['constant_norm']:.0f} against a token-varying RMS of "
        f"{top['varying_rms']:.0f}); where the constant part dominates, zero ablation mostly "
        "measures the removal of a constant vector (and the norm's rescaling), not of token "
        "information."
    )
    return [
        Text(text),
        Table(
            table,
            (
                f"Shares of the lens vectors' squared norm, {run}: per layer and subspace (basis "
                f"unembed, before the final norm, k = {int(top['k'])}), the constant part (the "
                "held-out mean's component) and the token-varying part, in percent of E||z||²; "
                f"they add up exactly. Every basis, site and k: {files['shares']}."
            ),
            digits=1,
        ),
    ]


H0 = AblationExperiment(
    "h0",
    "H0: SVD subspaces ablated in lens space",
    where="in lens space, z = T_i(h_i), the tuned lens's output in front of the unembedding",
    measure="KL(p_lens(z) ‖ p_lens(z ablated))",
    site="pre_norm",
    summary=shares,
)
section = H0.section
finding = H0.finding
