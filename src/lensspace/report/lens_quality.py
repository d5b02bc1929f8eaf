"""Lens quality against the H0 verdict: the lens retrained at several budgets, and whether
output > internal follows the lens's held-out KL."""

from __future__ import annotations

import pandas as pd

from lensspace import tables
from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.sections import Context, existing, figure


def read(files: dict) -> pd.DataFrame | None:
    path = existing(files.get("sweep"))
    return pd.read_csv(path, sep="\t") if path is not None else None


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
    lines = [
        f"The run's lens retrained at {len(budgets)} budgets ({', '.join(budgets)}: least "
        "squares on the first training tokens, "
        + ", ".join(f"{r.budget} {int(r.lstsq_tokens):,}" for r in fits.itertuples())
        + "; lstsq+kl holds out the last of its training sequences to decide, per layer, whether "
        f"the run's KL refinement is kept) at {words.layers(sweep['layer'])}; held-out lens KL "
        "averaged over these layers: "
        + ", ".join(f"{b} {words.number(v)}" for b, v in by_budget.items())
        + " nats."
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
    blocks: list = [Text(" ".join(lines))]
    blocks += figure(
        files.get("figure"),
        (
            f"H0 verdict against lens quality, {run}: output − internal KL (unembed "
            f"basis, k = {int(sweep['k'].iloc[0])}, pre_norm) with its 95% paired "
            "interval against the lens's held-out KL, one point per budget and layer "
            f"({len(budgets)} budgets, {sweep['layer'].nunique()} layers); panels: "
            f"{', '.join(dict.fromkeys(sweep['mode']))} mode."
        ),
    )
    blocks.append(
        Table(
            tables.lens_budget_table(sweep),
            (
                "Per budget, layer and mode: held-out lens KL, the ablation KLs (random: mean of "
                f"{int(sweep['n_draws'].iloc[0])} draws) and output − internal; [ ]: {interval}."
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
