"""Single MLP neurons: their lens-space geometry, and the entropy-neuron test of the last block
(which neurons are entropy neurons by the published definition, measured against matched
neurons), with the table and figure the workflow writes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.sections import Context, existing, figure, read_tsv


def legend(measured: pd.DataFrame, config: dict) -> str:
    """Every procedure behind the table, with the run's sizes."""
    settings = config.get("neurons", {})
    n_tokens = int(measured["n_tokens"].iloc[0]) if not measured.empty else 0
    n_matched = int(measured["n_matched"].iloc[0]) if not measured.empty else 0
    return (
        "Each last-block neuron mean-ablated alone (its activation replaced by its mean over "
        f"{settings.get('mean_sequences', '?')} training sequences, positions 1..) on "
        f"{n_tokens:,} held-out tokens. |ΔH| total: mean absolute change of the output's entropy "
        "(nats) through every path; direct: the final norm's scale frozen at its clean value; "
        "mediated: the per-token difference total − direct, in absolute value; mediated share = "
        "mediated / (mediated + direct). KL(model ‖ ablated) and the share of positions whose "
        "top-1 token changes, total. [ ]: 95% bootstrap intervals over sequences (bootstrap-t; "
        "BCa for top-1 shares; percentile for the mediated share). p: the rank of the neuron's "
        f"mediated share among the {n_matched} other last-block neurons nearest in log norm to the "
        "measured ones (one pool for all), (1 + #matched "
        "≥ it) / (matched + 1), Holm-adjusted over the measured neurons. Entropy neuron: mediated "
        f"share ≥ {settings.get('min_mediated_share', 0.5):g} and adjusted p < 0.05 (Stolfo et "
        "al. report the norm-mediated fraction of the loss change; this is of the entropy "
        "change). Null-space share: of the write's centred direction in the bottom "
        f"{int(measured['null_k'].iloc[0]) if 'null_k' in measured else '?'} right singular "
        "directions of the centred, gain-folded unembedding. Roles: "
        "candidate = among the largest-norm neurons whose null-space share is at least "
        f"{settings.get('null_ratio', 10):g}× a random direction's; largest = among the block's "
        "largest norms; published = on the run's reference list."
    )


def measured_table(measured: pd.DataFrame) -> pd.DataFrame:
    """Per measured neuron: role, geometry, the mediated share against its matched neurons, the
    effects with their intervals, the verdict."""

    def with_interval(name: str) -> pd.Series:
        return measured.apply(
            lambda r: f"{r[name]:.3g} [{r[name + '_lo']:.3g}, {r[name + '_hi']:.3g}]", axis=1
        )

    return pd.DataFrame(
        {
            "neuron": measured.apply(lambda r: f"{int(r['layer'])}.{int(r['neuron'])}", axis=1),
            "role": measured["role"],
            "norm": measured["norm"],
            "null-space share": measured["null_fraction"],
            "mediated share": with_interval("mediated_share"),
            "matched median": measured["matched_mediated_share_median"],
            "p (Holm)": measured["p_mediated_share_adjusted"],
            "abs ΔH total": with_interval("abs_dh_total"),
            "abs ΔH direct": with_interval("abs_dh_direct"),
            "abs ΔH mediated": with_interval("abs_dh_mediated"),
            "KL total": with_interval("kl_total"),
            "top-1 changed": with_interval("top1_total"),
            "entropy neuron": measured["entropy_neuron"].map({True: "yes", False: "no"}),
        }
    )


def plot(neurons: pd.DataFrame, reference: pd.DataFrame, title: str, path: str | Path) -> None:
    """Two panels of the last block: null-space share against norm (the geometry that picks
    candidates), and the mediated share against the null-space share for every ablated neuron."""
    from lensspace.plots import PALETTE, plt, save, style

    style()
    last = neurons[neurons["layer"] == neurons["layer"].max()]
    measured = last[last["role"].fillna("") != ""]
    ablated = last[last["mediated_share"].notna()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 2.9), layout="constrained")
    left.scatter(last["norm"], last["null_fraction"], s=3, color=PALETTE["random"], alpha=0.4)
    left.axhline(
        float(last["null_random"].iloc[0]), color="black", lw=0.8, ls=":", label="random direction"
    )
    right.scatter(
        ablated["null_fraction"],
        ablated["mediated_share"],
        s=4,
        color=PALETTE["random"],
        alpha=0.5,
        label=f"ablated controls ({len(ablated) - len(measured)})",
    )
    for ax, y in ((left, "null_fraction"), (right, "mediated_share")):
        x = "norm" if ax is left else "null_fraction"
        ax.scatter(
            measured[x],
            measured[y],
            s=28,
            facecolors="none",
            edgecolors=PALETTE["output"],
            lw=1.0,
            label=f"measured ({len(measured)})",
        )
        for row in measured.itertuples():
            ax.annotate(
                str(int(row.neuron)),
                (getattr(row, x), getattr(row, y)),
                fontsize=5.5,
                xytext=(3, 2),
                textcoords="offset points",
            )
        if not reference.empty:
            ref = last.merge(reference[["layer", "neuron"]], on=["layer", "neuron"])
            ax.scatter(ref[x], ref[y], marker="x", s=30, color="black", lw=1.0, label="published")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("output weight norm ||w||")
    left.set_ylabel(f"null-space share ({int(last['null_k'].iloc[0])} directions)")
    right.set_xscale("log")
    right.set_xlabel("null-space share")
    right.set_ylabel("mediated share of |ΔH|")
    right.set_ylim(-0.02, 1.02)
    for ax in (left, right):
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=8)
    save(fig, path)


def section(run: str, files: dict, context: Context) -> Section | None:
    """Single MLP neurons: geometry, the entropy-neuron test, the published list."""
    path = existing(files.get("neurons"))
    if path is None:
        return None
    neurons = pd.read_csv(path, sep="\t")
    measured = read_tsv(files["measured"])
    k = int(neurons["k"].iloc[0])
    n_layers = neurons["layer"].nunique()
    last = neurons[neurons["layer"] == neurons["layer"].max()]
    ratio = context.config.get("neurons", {}).get("null_ratio", 10)
    random_share = float(last["null_random"].iloc[0])
    lines = [
        f"{len(neurons):,} MLP neurons ({n_layers} blocks × {len(neurons) // n_layers:,}); the "
        "lens-space share of each neuron's output weight w is ||Qᵀ M w||² / ||M w||² in the "
        f"unembed basis, k = {k} (M = I + A_(l+1) of the residual block l writes into; I after the "
        f"last block); median internal share {neurons['internal_fraction'].median():.3f}.",
        "Entropy neurons (Stolfo et al. 2024) write into the effective null space of the "
        f"unembedding: here the bottom {words.count(int(last['null_k'].iloc[0]), 'direction')} "
        "(about 1% of d_model) of the centred unembedding with the final norm's gain folded in, "
        "where a random "
        f"direction has share {random_share:.4f}. In the last block "
        f"{int((last['null_fraction'] >= ratio * random_share).sum())} of {len(last):,} neurons "
        f"have {ratio:g}× that or more; the largest-norm neuron has "
        f"{float(last.loc[last['norm'].idxmax(), 'null_fraction']):.3f}.",
    ]
    if not measured.empty:
        found = measured[measured["entropy_neuron"].astype(bool)]
        lines.append(
            f"{len(measured)} neurons measured, each against its "
            f"{int(measured['n_matched'].iloc[0])} matched neurons: "
            + ", ".join(
                f"{int(r.neuron)} ({r.role}; mediated share {r.mediated_share:.2f} against a "
                f"matched median {r.matched_mediated_share_median:.2f}, "
                f"p {r.p_mediated_share_adjusted:.2g})"
                for r in measured.itertuples()
            )
            + ". "
            + (
                "Entropy neurons by that criterion: "
                + ", ".join(str(int(n)) for n in found["neuron"])
                + "."
                if not found.empty
                else "None of them is an entropy neuron by that criterion."
            )
        )
    reference_path = existing(files.get("reference"))
    reference = read_tsv(reference_path) if reference_path is not None else pd.DataFrame()
    if not reference.empty:
        named = "; ".join(
            f"{int(r.layer)}.{int(r.neuron)}: norm rank {int(r.norm_rank_in_layer)}, null-space "
            f"share {r.null_fraction:.3f}"
            + (
                f", mediated share {r.mediated_share:.2f}, "
                f"{'an entropy neuron' if bool(r.entropy_neuron) else 'not an entropy neuron'} here"
                if pd.notna(r.mediated_share)
                else ""
            )
            for r in reference.itertuples()
        )
        lines.append(f"Published entropy neurons ({reference['reference'].iloc[0]}): {named}.")
    blocks: list = [Text(" ".join(lines))]
    blocks += figure(
        files.get("figure"),
        (
            f"Last block of {run}. Left: every neuron's output weight norm against its null-space "
            "share (dotted: a random direction's). Right: every ablated neuron's null-space share "
            "against the share of its entropy effect mediated by the final norm's scale; circles: "
            "the measured neurons"
            + ("; crosses: the published entropy neurons." if not reference.empty else ".")
        ),
    )
    if not measured.empty:
        blocks.append(
            Table(
                measured_table(measured),
                legend(measured, context.config),
                markdown_path=files.get("table"),
            )
        )
    return Section("neurons", "Single neurons (entropy neurons)", blocks)


def finding(run: str, files: dict, context: Context) -> Finding | None:
    """Whether the model has entropy neurons by the published definition, and which."""
    path = existing(files.get("measured"))
    if path is None:
        return None
    measured = read_tsv(path)
    if measured.empty:
        return Finding("Single neurons", "No last-block neuron was measured.")
    if not measured["final_norm"].astype(bool).all():
        return Finding(
            "Single neurons",
            "The model has no final norm (its blocks normalise their own output): there is no "
            "scale to freeze, and the entropy-neuron test does not apply.",
        )
    if not measured["verdict_possible"].astype(bool).all():
        return Finding(
            "Single neurons",
            f"No entropy-neuron verdict was possible: {len(measured)} measured neurons against "
            f"{int(measured['n_matched'].iloc[0])} matched each cannot clear Holm's correction "
            "(raise neurons.n_matched).",
        )
    found = measured[measured["entropy_neuron"].astype(bool)]
    share = context.config.get("neurons", {}).get("min_mediated_share", 0.5)
    criterion = (
        f"(a last-block neuron that passes at least {share:g} of its entropy effect through the "
        "final norm's scale, more than its neurons of like norm, Holm-corrected)"
    )
    if found.empty:
        sentence = (
            f"This model has no entropy neuron among the {len(measured)} measured {criterion}."
        )
    else:
        sentence = (
            f"This model has {len(found)} entropy neuron{'s' if len(found) > 1 else ''} "
            f"among the {len(measured)} measured {criterion}: "
            + ", ".join(
                f"{int(r.neuron)} (mediated share {r.mediated_share:.2f})"
                for r in found.itertuples()
            )
            + "."
        )
    return Finding("Single neurons", sentence)
