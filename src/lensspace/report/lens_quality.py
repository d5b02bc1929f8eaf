"""Lens quality against the H0 verdict: the lens retrained at several budgets, and whether
output > internal follows the lens's held-out KL."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.sections import Context, existing, figure


def read(files: dict) -> pd.DataFrame | None:
    path = existing(files.get("sweep"))
    return pd.read_csv(path, sep="\t") if path is not None else None


LEGEND = (
    "Held-out KL(p_final ‖ p_lens) of lenses trained at each budget, and the seed-layout H0 cell "
    "(unembed basis, k = d/2, pre_norm): KL of ablating the output and internal subspace, their "
    "paired difference output − internal over held-out sequences with its 95% bootstrap-t "
    "interval; the verdict needs the p-value Holm-corrected over the sweep (`p (Holm)`) below "
    "0.05. `trained`: what the layer's lens is: least squares on the first `lstsq tokens` of the "
    "training tokens (`lstsq`), then the KL refinement where its check on held-out training "
    "sequences kept it (`lstsq+kl`), or least squares only where the check reverted it (`lstsq, "
    "kl reverted`: fitted on fewer tokens than `lstsq` alone, the rest held out for the check); "
    "`run's lens`: this budget is the run's own lens (same tokens, settings and per-layer seeds)."
)


def budget_table(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per budget, layer and mode: what was trained, lens KL, ablation KLs, output − internal with
    its interval, verdict."""

    def interval(name: str, lo: str, hi: str) -> pd.Series:
        return sweep.apply(lambda r: f"{r[name]:.3f} [{r[lo]:.3f}, {r[hi]:.3f}]", axis=1)

    return pd.DataFrame(
        {
            "trained": sweep["trained"],
            "refinement": sweep["refine_kept"]
            .map({True: "kept", False: "reverted"})
            .fillna("none"),
            "run's lens": sweep["run_lens"].map({True: "yes", False: "no"}),
            "lstsq tokens": sweep["lstsq_tokens"],
            "layer": sweep["layer"],
            "mode": sweep["mode"],
            "lens KL": interval("lens_kl", "lens_kl_lo", "lens_kl_hi"),
            "KL output": sweep["kl_output"],
            "KL internal": sweep["kl_internal"],
            "KL random": sweep["kl_random"],
            "output − internal": interval("diff", "diff_lo", "diff_hi"),
            "p (Holm)": sweep["p_adjusted"],
            "verdict": sweep["verdict"],
        }
    )


# Marker per trained kind: filled circle, open circle, open square.
MARKERS = {"lstsq+kl": ("o", True), "lstsq": ("o", False), "kl reverted": ("s", False)}


def kind(trained: str) -> str:
    return "kl reverted" if "reverted" in trained else trained.split(" ", 1)[1]


def plot(sweep: pd.DataFrame, title: str, path: str | Path) -> None:
    """Output − internal KL (with its interval) against lens KL; colour: layer; marker: what was
    trained at that layer (refinement kept, least squares only, refinement reverted)."""
    import matplotlib

    from lensspace.plots import plt, save, style

    style()
    modes = list(dict.fromkeys(sweep["mode"]))
    fig, axes = plt.subplots(
        1, len(modes), figsize=(3.4 * len(modes), 2.8), layout="constrained", squeeze=False
    )
    norm = matplotlib.colors.Normalize(
        sweep["layer"].min(), max(sweep["layer"].max(), sweep["layer"].min() + 1)
    )
    cmap = matplotlib.colormaps["viridis"]
    for ax, mode in zip(axes[0], modes):
        part = sweep[sweep["mode"] == mode]
        for (layer, refine), group in part.groupby(["layer", "refine"]):
            group = group.sort_values("lens_kl")
            color = cmap(norm(layer))
            ax.plot(
                group["lens_kl"], group["diff"], color=color, lw=0.8, ls="-" if refine else "--"
            )
            for row in group.itertuples():
                marker, filled = MARKERS[kind(row.trained)]
                ax.errorbar(
                    row.lens_kl,
                    row.diff,
                    yerr=[[row.diff - row.diff_lo], [row.diff_hi - row.diff]],
                    color=color,
                    marker=marker,
                    ms=3.5,
                    capsize=1.5,
                    mfc=color if filled else "white",
                )
        ax.axhline(0, color="#7f8c8d", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("lens KL, held out (nats)")
        ax.set_ylabel("KL(output) − KL(internal)")
        ax.set_title(f"mode {mode}", fontsize=8)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[0, -1], label="layer")
    fig.suptitle(
        f"{title}\nfilled circle: refinement kept; open circle: least squares only; open square: "
        "refinement reverted (least squares on fewer tokens); solid / dashed: budgets with / "
        "without refinement",
        fontsize=7,
    )
    save(fig, path)


def correlation(part: pd.DataFrame) -> float:
    """Rank correlation of the lens's held-out KL with output − internal."""
    return part["lens_kl"].rank().corr(part["diff"].rank())


def section(run: str, files: dict, context: Context) -> Section | None:
    sweep = read(files)
    if sweep is None:
        return None
    budgets = list(dict.fromkeys(sweep["budget"]))
    by_budget = sweep.groupby("budget", sort=False)["lens_kl"].mean()
    fits = sweep.drop_duplicates("budget")
    interval = words.interval(context.n_resamples)
    refined = sweep[sweep["refine_kept"].notna()].drop_duplicates(["budget", "layer"])
    reverted = refined[refined["trained"].str.contains("reverted")]
    own = sweep[sweep["run_lens"].astype(bool)]
    lines = [
        f"The run's lens retrained at {len(budgets)} budgets ({', '.join(budgets)}: least "
        "squares on the first training tokens, "
        + ", ".join(f"{r.budget} {int(r.lstsq_tokens):,}" for r in fits.itertuples())
        + "; lstsq+kl holds out the last of its training sequences to decide, per layer, whether "
        f"the run's KL refinement is kept) at {words.layers(sweep['layer'])}; held-out lens KL "
        "averaged over these layers: "
        + ", ".join(f"{b} {words.number(v)}" for b, v in by_budget.items())
        + " nats.",
        (
            f"The check reverted the refinement at {len(reverted)} of {len(refined)} (budget, "
            "layer) points ("
            + ", ".join(f"{r.budget} at layer {int(r.layer)}" for r in reverted.itertuples())
            + "): those lenses are least squares on fewer tokens, labelled 'kl reverted'."
            if len(reverted)
            else f"The refinement was kept at every one of the {len(refined)} (budget, layer) "
            "points that had it."
            if len(refined)
            else ""
        ),
        (
            f"The '{own['budget'].iloc[0]}' budget is the run's own lens (same tokens, settings "
            "and per-layer seeds)."
            if len(own)
            else "No budget is the run's own lens (the run's lens was not trained here, or the "
            "sweep has no budget of all its training sequences)."
        ),
    ]
    for mode, part in sweep.groupby("mode", sort=False):
        counts = part["verdict"].value_counts()
        best = part.loc[part.groupby("layer")["lens_kl"].idxmin()]
        worst = part.loc[part.groupby("layer")["lens_kl"].idxmax()]
        holds = lambda frame: int((frame["verdict"] == "output > internal").sum())  # noqa: E731
        lines.append(
            f"Mode {mode}: output > internal at {counts.get('output > internal', 0)} of "
            f"{len(part)} (budget, layer) points, internal > output at "
            f"{counts.get('internal > output', 0)}, not separable at "
            f"{counts.get('not separable', 0)}; with each layer's best lens it holds at "
            f"{holds(best)} of {len(best)} layers, with its worst at {holds(worst)}; rank "
            f"correlation of lens KL with output − internal {correlation(part):.2f}."
        )
    lines.append(
        "Each verdict: paired bootstrap-t test of KL(ablate output) − KL(ablate internal) over "
        f"the sequences of {words.tokens(sweep)} held-out tokens, Holm-corrected over the "
        f"sweep's {len(sweep)} points (family-wise 0.05); the intervals are the uncorrected 95% "
        "ones."
    )
    blocks: list = [Text(" ".join(line for line in lines if line))]
    blocks += figure(
        files.get("figure"),
        (
            f"H0 verdict against lens quality, {run}: output − internal KL (unembed "
            f"basis, k = {int(sweep['k'].iloc[0])}, pre_norm) with its 95% paired "
            "interval against the lens's held-out KL, one point per budget and layer, marked by "
            "what was trained "
            f"({len(budgets)} budgets, {sweep['layer'].nunique()} layers); panels: "
            f"{', '.join(dict.fromkeys(sweep['mode']))} mode."
        ),
    )
    blocks.append(
        Table(
            budget_table(sweep),
            (
                "Per budget, layer and mode: what was trained, held-out lens KL, the ablation KLs "
                f"(random: mean of {int(sweep['n_draws'].iloc[0])} draws) and output − internal; "
                f"[ ]: {interval}. 'kl reverted': the refinement's check reverted it, least "
                "squares on fewer tokens than lstsq alone."
            ),
            markdown_path=files.get("table"),
            collapsed=True,
        )
    )
    return Section("lens-budget", "Lens quality against the H0 verdict", blocks)


def finding(run: str, files: dict, context: Context) -> Finding | None:
    """Per mode: at how many (budget, layer) points the output subspace costs more, and
    whether a worse lens widens or narrows the gap."""
    sweep = read(files)
    if sweep is None or sweep.empty:
        return None
    parts = []
    for mode, part in sweep.groupby("mode", sort=False):
        corr = correlation(part)
        trend = (
            f", a worse lens going with a {'larger' if corr > 0 else 'smaller'} output − "
            f"internal difference (rank correlation {corr:.2f})"
            if pd.notna(corr) and corr != 0
            else ""
        )
        parts.append(
            f"in {mode} mode ablating the output subspace costs more KL than ablating the "
            f"internal one at {int((part['diff'] > 0).sum())} of {len(part)} (budget, layer) "
            f"points{trend}"
        )
    sentence = "; ".join(parts)
    return Finding(
        "Lens quality against the H0 verdict",
        f"With the lens retrained at {sweep['budget'].nunique()} budgets, {sentence}.",
    )
