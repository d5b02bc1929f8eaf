"""Per-node lenses against direct attribution, the layer's lens and a first-order estimate: how
much of each head's and MLP's total effect each predicts, where, and the induction-head test on
output shares through each."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.sections import Context, existing, figure, read_tsv

NAMES = {
    "none": "no change",
    "dla": "direct (DLA)",
    "layer_lens": "layer lens M w",
    "jacobian": "first order J w",
    "node_lens": "node lens",
    "measured": "total effect",
}
PREDICTORS = ("dla", "layer_lens", "jacobian", "node_lens")

LEGEND = (
    "Each attention head and MLP of the measured blocks mean-ablated (its write replaced by its "
    "mean over training positions 1..) and run through every later block from the cached "
    "residual: the change dz of the final residual before the norm is its exact total effect. "
    "Predictions of dz from the write's change dw: direct (DLA: dw itself; its output through "
    "the final norm with the clean scale frozen), the layer's tuned lens (M dw, M = I + A of the "
    "next residual's translator), first order (J dw, J the average response of the final "
    "residual to one shift of the write at every position, by forward differences on training "
    "positions) and the node's own affine lens (least squares from the write to dz on training "
    "tokens, its ridge chosen on held-out training sequences). R²: 1 − Σ‖dz − prediction‖² / "
    "Σ‖dz − mean dz‖² over held-out tokens, with a 95% percentile bootstrap interval over "
    "sequences; KL(ablated output ‖ predicted output), nats, at every kl_stride-th position, "
    "with its bootstrap-t interval. Node lens − baseline: the gain in R², its percentile "
    "interval, and the exact sign test of the per-sequence error differences, Holm-corrected "
    "over every node and baseline, direction by the majority of sequences."
)


def summary_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Per layer and node kind: the mean R² and KL of each method over its nodes."""
    rows = []
    for (layer, kind), part in scores.groupby(["layer", "kind"], sort=True):
        row = {"layer": int(layer), "kind": kind, "nodes": part["node"].nunique()}
        for method in PREDICTORS:
            m = part[part["method"] == method]
            row[f"R² {NAMES[method]}"] = m["r2"].mean()
        for method in PREDICTORS:
            m = part[part["method"] == method]
            row[f"R² {NAMES[method]}, offset removed"] = m["r2_offset_free"].mean()
        for method in ("none", *PREDICTORS):
            m = part[part["method"] == method]
            row[f"KL {NAMES[method]}"] = m["kl"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(row, value: str, lo: str, hi: str) -> str:
    return f"{words.number(row[value])} [{words.number(row[lo])}, {words.number(row[hi])}]"


def node_table(scores: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """Per node: each method's R² and KL with intervals, the output shares, the verdicts."""
    rows = []
    for node, part in scores.groupby("node", sort=False):
        by = part.set_index("method")
        row = {"node": node, "effect RMS": by.loc["measured", "effect_rms"]}
        for method in PREDICTORS:
            row[f"R² {NAMES[method]}"] = _interval(by.loc[method], "r2", "r2_lo", "r2_hi")
        for method in ("none", "dla", "node_lens"):
            row[f"KL {NAMES[method]}"] = _interval(by.loc[method], "kl", "kl_lo", "kl_hi")
        for method in ("measured", "node_lens", "layer_lens", "dla"):
            row[f"output share, {NAMES[method]}"] = by.loc[method, "output_share"]
        for c in comparisons[comparisons["node"] == node].itertuples(index=False):
            row[f"node lens − {NAMES[c.baseline]}"] = (
                f"{words.number(c.r2_gain)} [{words.number(c.gain_lo)}, "
                f"{words.number(c.gain_hi)}], p_adj {words.number(c.p_adjusted)}: {c.verdict}"
            )
        rows.append(row)
    return pd.DataFrame(rows)


def rank_table(ranks: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "method": [NAMES[m] for m in ranks["method"]],
            "Spearman ρ, predicted vs measured effect size": [
                _interval(r, "spearman", "spearman_lo", "spearman_hi") for _, r in ranks.iterrows()
            ],
            "nodes": ranks["n_nodes"],
        }
    )


def induction_table(induction: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "output share of the ablation's change, through": [
                NAMES[s] for s in induction["share"]
            ],
            "induction − other heads of the layer": [
                _interval(r, "statistic", "effect_lo", "effect_hi") for _, r in induction.iterrows()
            ],
            "p": induction["p_value"],
            "induction heads": induction["n_compared"],
            "layers": induction["layers"],
        }
    )


def plot(scores: pd.DataFrame, title: str, path: str | Path) -> None:
    """Left: R² by measured block, one marker per node kind and a colour per method (bars: the
    means).
    Right: each node's R², node lens against every baseline, with the diagonal."""
    import seaborn as sns

    from lensspace.plots import plt, save, style

    style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.0), layout="constrained")
    colors = dict(zip(PREDICTORS, sns.color_palette("colorblind", len(PREDICTORS))))
    markers = {"head": "o", "mlp": "s"}
    offsets = dict(zip(PREDICTORS, (-0.3, -0.1, 0.1, 0.3)))
    blocks = sorted(scores["layer"].unique())
    slot = {layer: i for i, layer in enumerate(blocks)}  # measured blocks side by side
    shapes = dict(zip(PREDICTORS[:-1], ("o", "^", "s")))
    for method in PREDICTORS:
        part = scores[scores["method"] == method]
        for kind, marker in markers.items():
            k = part[part["kind"] == kind]
            left.scatter(
                k["layer"].map(slot) + offsets[method],
                k["r2"],
                color=colors[method],
                marker=marker,
                s=10 if kind == "head" else 24,
                alpha=0.8,
                label=NAMES[method] if kind == "head" else None,
            )
        means = part.groupby("layer")["r2"].mean()
        centres = [slot[layer] + offsets[method] for layer in means.index]
        left.hlines(
            means.values,
            [c - 0.08 for c in centres],
            [c + 0.08 for c in centres],
            color=colors[method],
            lw=1.5,
        )
        if method != "node_lens":
            lens = scores[scores["method"] == "node_lens"].set_index("node")["r2"]
            base = part.set_index("node")["r2"]
            right.scatter(
                base,
                lens.reindex(base.index),
                color=colors[method],
                marker=shapes[method],
                s=12,
                alpha=0.7,
                label=NAMES[method],
            )
    low = min(0.0, float(scores.loc[scores["method"].isin(PREDICTORS), "r2"].min()))
    right.plot([low, 1], [low, 1], color="#7f8c8d", lw=0.8, ls="--")
    left.axhline(0, color="#7f8c8d", lw=0.6)
    left.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    left.set_xlabel("block (circles: heads; squares: MLPs; bars: means)")
    left.set_ylabel("held-out R² of the total effect")
    left.legend(fontsize=6)
    right.set_xlabel("R², baseline")
    right.set_ylabel("R², node lens")
    right.legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    save(fig, path)


def _frames(files: dict) -> tuple[pd.DataFrame, ...] | None:
    paths = [existing(files.get(key)) for key in ("scores", "comparisons", "ranks", "induction")]
    if any(p is None for p in paths):
        return None
    return tuple(read_tsv(p) for p in paths)


def _verdict_counts(comparisons: pd.DataFrame, baseline: str) -> tuple[int, int, int]:
    """(node lens better, baseline better, compared) against one baseline."""
    part = comparisons[comparisons["baseline"] == baseline]
    return (
        int((part["verdict"] == "node lens better").sum()),
        int((part["verdict"] == "baseline better").sum()),
        len(part),
    )


def _equivalent(comparisons: pd.DataFrame, baseline: str) -> int:
    part = comparisons[comparisons["baseline"] == baseline]
    return int((part["verdict"] == "equivalent").sum())


def describe(
    scores: pd.DataFrame, comparisons: pd.DataFrame, ranks: pd.DataFrame, induction: pd.DataFrame
) -> list[str]:
    """The answer from the tables: R² of the node lens against direct attribution per layer and
    kind, the verdict counts against each baseline, the rank correlations, the induction test."""
    lines = []
    better, worse, n = _verdict_counts(comparisons, "dla")
    summary = summary_table(scores)
    where = "; ".join(
        f"block {int(r['layer'])} {'heads' if r['kind'] == 'head' else 'MLP'} "
        f"{r['R² node lens']:.2f} against {r['R² direct (DLA)']:.2f}"
        for _, r in summary.iterrows()
    )
    if better > worse:
        verdict = "predict total effects better than direct attribution"
    elif worse > better:
        verdict = "predict total effects worse than direct attribution"
    else:
        verdict = "cannot be told apart from direct attribution"
    margin = float(comparisons["margin"].iloc[0]) if len(comparisons) else 0.0
    free = ", ".join(
        f"{NAMES[m]} {scores.loc[scores['method'] == m, 'r2_offset_free'].mean():.2f}"
        for m in PREDICTORS
    )
    lines.append(
        f"Per-node lenses {verdict}: their held-out R² is higher by at least {margin:g}, on a "
        f"significant majority of sequences, for {better} of {n} nodes, lower for {worse}, and "
        f"equivalent within {margin:g} for {_equivalent(comparisons, 'dla')} (mean R², node lens "
        f"against DLA: {where}). With each method's mean error removed (what the lens's "
        f"intercept adds), the mean R² is {free}."
    )
    for baseline in ("layer_lens", "jacobian"):
        b, w, m = _verdict_counts(comparisons, baseline)
        lines.append(f"Against the {NAMES[baseline]}: better for {b} of {m} nodes, worse for {w}.")
    if not ranks.empty:
        lines.append(
            "Across nodes, the rank correlation of predicted with measured effect sizes is "
            + ", ".join(
                f"{NAMES[r['method']]} {r['spearman']:.2f} [{r['spearman_lo']:.2f}, "
                f"{r['spearman_hi']:.2f}]"
                for _, r in ranks.iterrows()
            )
            + "."
        )
    if not induction.empty:
        parts = []
        for _, r in induction.iterrows():
            if r["n_compared"] == 0:
                continue
            parts.append(
                f"through {NAMES[r['share']]}: {words.number(r['statistic'])} "
                f"[{words.number(r['effect_lo'])}, {words.number(r['effect_hi'])}], "
                f"p {words.number(r['p_value'])}"
            )
        if parts:
            lines.append(
                "Induction heads against the other heads of their layer, output-subspace share of "
                "the ablation's change "
                f"(induction heads: {int(induction['n_compared'].iloc[0])}, in blocks "
                f"{induction['layers'].iloc[0]}): " + "; ".join(parts) + "."
            )
        else:
            lines.append(
                "No measured block holds both induction and other heads, so the induction-head "
                "test has nothing to compare."
            )
    return lines


def section(run: str, files: dict, context: Context) -> Section | None:
    frames = _frames(files)
    if frames is None:
        return None
    scores, comparisons, ranks, induction = frames
    blocks: list = [Text(" ".join(describe(scores, comparisons, ranks, induction)))]
    blocks += figure(
        files.get("figure"),
        (
            f"Nodes, {run}: left, each node's held-out R² of its total effect per method by block "
            "(circles heads, squares MLPs; lines the means); right, the node lens's R² against "
            "each baseline's, per node (above the diagonal: the node lens predicts more)."
        ),
    )
    blocks.append(Table(summary_table(scores), "Mean R² and KL per block, node kind and method."))
    blocks.append(Table(rank_table(ranks), "Rank correlation across nodes, with intervals."))
    blocks.append(Table(induction_table(induction), "The induction-head test on output shares."))
    blocks.append(
        Table(
            node_table(scores, comparisons),
            LEGEND,
            markdown_path=files.get("table"),
            collapsed=True,
        )
    )
    return Section("nodes", "Nodes: a lens per head and MLP, scored on its total effect", blocks)


def finding(run: str, files: dict, context: Context) -> Finding | None:
    frames = _frames(files)
    if frames is None:
        return None
    scores, comparisons, _, _ = frames
    better, worse, n = _verdict_counts(comparisons, "dla")
    lens = scores[scores["method"] == "node_lens"]["r2"].mean()
    dla = scores[scores["method"] == "dla"]["r2"].mean()
    return Finding(
        "Nodes",
        f"A per-node lens predicts a node's total effect better than direct attribution for "
        f"{better} of {n} nodes and worse for {worse} (mean held-out R² {lens:.2f} against "
        f"{dla:.2f}; exact sign tests over sequences, Holm-corrected).",
    )
