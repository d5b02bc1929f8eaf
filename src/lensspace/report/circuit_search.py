"""Circuit search cut down by circuit ends and beginnings: does restricting EAP-IG to the nodes the
study's task-independent labels pick keep the full search's faithfulness at a fraction of its
compute, against per-task attribution pruning and random nodes?"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lensspace.experiments.circuit_search import GOAL_COMPUTE, GOAL_FAITHFULNESS
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.sections import Context, existing, figure, read_tsv

NAMES = {
    "full": "full search",
    "labels": "ends and beginnings",
    "attribution": "attribution pruning",
    "random": "random nodes",
}
METHODS = ("labels", "attribution", "random")

LEGEND = (
    "Per task: the model's accuracy on the clean prompts (metric > 0: it prefers the right "
    "answer; top-1: the right answer is its most likely token) and on the corrupted ones. Per "
    "search: EAP-IG over every edge of the graph (full), or over the edges between a kept "
    "fraction of the nodes, the others held at their corrupted writes: the top nodes by the "
    "study's task-independent labels (the larger percentile of a node's circuit-end label, the "
    "output-subspace share of its write through the lens, and its circuit-beginning label, the "
    "share of its read weights on the embedding's top directions), by the task's own plain-EAP "
    "node attribution (whose pass is counted in its cost), or at random (mean over draws). "
    "Faithfulness at a budget: Σ(m(circuit) − m(all patched)) / Σ(m(clean) − m(all patched)) "
    "over prompts, the circuit being the budget's top edges by |score|; AUC: its mean over log "
    "budget; relative: a search's AUC over the full search's on the same prompts; vs random: "
    "its AUC minus the random control's. Intervals: 95% bootstrap-t over prompts, paired, not "
    "corrected for the number of cells. Compute: the search's FLOPs over the full search's "
    "(nodes held at their corrupted writes are not computed; a backward pass counts twice its "
    "forward); wall: the measured wall time's ratio (this runner computes every node). Recall: "
    "the share of the full search's top edges in the search's circuit, averaged over budgets. "
    "Goal: "
    f"relative AUC ≥ {GOAL_FAITHFULNESS:.0%} at compute ≤ {GOAL_COMPUTE:.0%}."
)


def _interval(value: float, lo: float, hi: float, digits: int = 2) -> str:
    if pd.isna(value):
        return ""
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def accuracy_table(prompts: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per task: the model's accuracy and mean metric on the clean and corrupted prompts."""
    rows = []
    for task, frame in prompts.items():
        rows.append(
            {
                "task": task,
                "prompts": len(frame),
                "clean: metric > 0": frame["clean_correct"].mean(),
                "clean: top-1": frame["clean_top1"].mean(),
                "clean: mean metric": frame["clean_metric"].mean(),
                "corrupted: metric > 0": frame["corrupt_correct"].mean(),
                "corrupted: mean metric": frame["corrupt_metric"].mean(),
            }
        )
    return pd.DataFrame(rows)


def search_table(summaries: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per task and search: AUC, relative AUC, against random, compute, wall time, recall."""
    rows = []
    for task, frame in summaries.items():
        for row in frame.sort_values(["fraction", "method"], ascending=[False, True]).itertuples():
            rows.append(
                {
                    "task": task,
                    "search": NAMES.get(row.method, row.method),
                    "nodes kept": f"{row.fraction:.0%}",
                    "MLPs kept": f"{row.kept_mlps:.0f}",
                    "AUC": _interval(row.auc, row.auc_lo, row.auc_hi),
                    "relative AUC": _interval(
                        row.relative_auc, row.relative_auc_lo, row.relative_auc_hi
                    ),
                    "vs random": _interval(row.vs_random, row.vs_random_lo, row.vs_random_hi),
                    "compute": f"{row.compute:.2f}",
                    "wall": f"{row.wall_time:.2f}",
                    "recall": f"{row.recall:.2f}",
                    "goal": "met" if row.goal_met else "",
                }
            )
    return pd.DataFrame(rows)


def _percent(value: float) -> str:
    """A share as a whole percentage, without a sign on a rounded zero."""
    return f"{round(100 * value) + 0:d}%"


def best_within_goal(summary: pd.DataFrame, method: str) -> pd.Series | None:
    """The ``method``'s search of largest relative AUC within the compute goal (None: none)."""
    part = summary[(summary["method"] == method) & (summary["compute"] <= GOAL_COMPUTE)]
    if part.empty:
        return None
    return part.loc[part["relative_auc"].idxmax()]


def answer(summaries: dict[str, pd.DataFrame]) -> str:
    """The one sentence: whether the labels reach the goal on every task, with the numbers."""
    parts, met = [], 0
    for task, summary in summaries.items():
        if not summary["separated"].all():
            parts.append(
                f"{task}: undefined, the model does not separate its clean from its corrupted "
                "prompts"
            )
            continue
        best = best_within_goal(summary, "labels")
        if best is None:
            parts.append(f"{task}: no label search within {GOAL_COMPUTE:.0%} of the compute")
            continue
        met += bool(best["goal_met"])
        parts.append(
            f"{task} {_percent(best['relative_auc'])} [{_percent(best['relative_auc_lo'])}, "
            f"{_percent(best['relative_auc_hi'])}] at {_percent(best['compute'])} of the compute "
            f"({_percent(best['fraction'])} of the nodes)"
        )
    verdict = "reach" if met == len(summaries) else "do not reach"
    return (
        f"Task-independent circuit-end and beginning labels {verdict} the goal "
        f"(≥ {GOAL_FAITHFULNESS:.0%} of the full search's faithfulness at ≤ {GOAL_COMPUTE:.0%} "
        f"of its compute) on {met} of {len(summaries)} tasks: " + "; ".join(parts) + "."
    )


def controls(summaries: dict[str, pd.DataFrame]) -> str:
    """How the label searches compare with the controls at the same fractions."""
    parts = []
    for task, summary in summaries.items():
        if not summary["separated"].all():
            continue
        labels = summary[summary["method"] == "labels"].set_index("fraction")
        pruning = summary[summary["method"] == "attribution"].set_index("fraction")
        for fraction, row in labels.iterrows():
            above = row["vs_random_lo"] > 0
            below = row["vs_random_hi"] < 0
            word = "above" if above else "below" if below else "not separable from"
            parts.append(
                f"{task} at {fraction:.0%}: {word} random (AUC {row['vs_random']:+.2f}), "
                f"attribution pruning {pruning.loc[fraction, 'relative_auc']:.0%} of the full "
                "search's AUC"
            )
    if not parts:
        return "No task separates its clean from its corrupted prompts: no control is compared."
    return "Against the controls: " + "; ".join(parts) + "."


def plot(summaries: dict[str, pd.DataFrame], title: str, path: str | Path) -> None:
    """One panel per task: relative AUC against compute, one line per search method over the
    fractions, the full search at (1, 1) and the goal's corner shaded."""
    import seaborn as sns

    from lensspace.plots import plt, save, style

    style()
    n = len(summaries)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 2.8), layout="constrained", squeeze=False)
    colors = dict(zip(METHODS, sns.color_palette("colorblind", len(METHODS))))
    for ax, (task, summary) in zip(axes[0], summaries.items()):
        ax.axvspan(0, GOAL_COMPUTE, ymin=0, ymax=1, color="#2ecc71", alpha=0.06)
        ax.axhline(GOAL_FAITHFULNESS, color="#7f8c8d", lw=0.6, ls="--")
        for method in METHODS:
            part = summary[summary["method"] == method].sort_values("compute")
            ax.errorbar(
                part["compute"],
                part["relative_auc"],
                yerr=[
                    part["relative_auc"] - part["relative_auc_lo"],
                    part["relative_auc_hi"] - part["relative_auc"],
                ],
                color=colors[method],
                marker="o",
                ms=3,
                lw=1,
                capsize=2,
                label=NAMES[method],
            )
        ax.scatter([1.0], [1.0], color="black", marker="*", s=40, label=NAMES["full"], zorder=3)
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("compute (FLOPs / full search's)")
        ax.set_title(task, fontsize=8)
    axes[0][0].set_ylabel("faithfulness AUC / full search's")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    save(fig, path)


def _frames(files: dict) -> tuple[dict, dict] | None:
    prompts, summaries = {}, {}
    for task, path in (files.get("summary") or {}).items():
        found = existing(path)
        found_prompts = existing((files.get("prompts") or {}).get(task))
        if found is None or found_prompts is None:
            return None
        summaries[task] = read_tsv(found)
        prompts[task] = read_tsv(found_prompts)
    return (prompts, summaries) if summaries else None


def section(run: str, files: dict, context: Context) -> Section | None:
    frames = _frames(files)
    if frames is None:
        return None
    prompts, summaries = frames
    blocks: list = [Text(answer(summaries)), Text(controls(summaries))]
    blocks += figure(
        files.get("figure"),
        (
            f"Circuit search, {run}: per task, each search's faithfulness AUC relative to the full "
            "search's against its compute relative to the full search's, one line per method "
            "over the fractions of nodes kept (bars: 95% intervals over prompts; shaded: within "
            "the compute goal; dashed: the faithfulness goal)."
        ),
    )
    blocks.append(Table(accuracy_table(prompts), "The model's accuracy on each task's prompts."))
    blocks.append(
        Table(search_table(summaries), LEGEND, markdown_path=files.get("table"), collapsed=True)
    )
    return Section(
        "circuit_search", "Circuit search cut down by circuit ends and beginnings", blocks
    )


def finding(run: str, files: dict, context: Context) -> Finding | None:
    frames = _frames(files)
    if frames is None:
        return None
    return Finding("Circuit search", answer(frames[1]))
