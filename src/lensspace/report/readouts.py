"""Readouts in place of the unembedding: their labels against W_U's, fidelity, H0 verdicts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.sections import Context, existing, figure

LEGEND = (
    "Per readout: its kind and definition, the size k of its output and internal subspaces "
    "(half its rank: the top and the bottom k of its row space), the mean squared cosine of the "
    "principal angles between its output subspace and W_U's (centred, gain folded in, top d/2) "
    "beside that of random k-dim subspaces (mean of 8), the readout's rank, a back half's "
    "split-half agreement (mean cos² between the output subspaces from either half of the "
    "Jacobian's sequences; chance 0.5), and a probe's held-out accuracy, "
    "balanced accuracy and expected calibration error (10 bins). Per readout, layer and mode: "
    "the held-out KL(readout(model's state) ‖ readout(lens)) on the run's corpus with its 95% "
    "bootstrap interval over sequences, the identity view's (the residual read as it is), a "
    "masked readout's set mass (the whole head's probability of its tokens, through the lens), the "
    "KL of ablating the readout's output, internal and random subspaces (random: k-dim "
    "subspaces of its row space, mean of the draws; a rank-1 readout, such as a two-class probe, "
    "has only its output cell) and output − internal, output − random: the mean difference with "
    "its paired 95% bootstrap-t interval over sequences, how many sequences lie above 0, the "
    "Holm-adjusted p and, against random, the range of the draws' means, and the verdict: the "
    "exact two-sided sign test of the per-sequence differences, Holm-corrected over the "
    "readout's layers, modes and both comparisons, its direction that of the majority of "
    "sequences (so it can disagree with the mean's sign where a few sequences dominate), and "
    "against random the output's KL beyond every draw's."
)


def read_all(paths: dict[str, str | Path]) -> pd.DataFrame:
    """The TSVs of every readout, concatenated (readouts whose file is missing left out)."""
    frames = [pd.read_csv(p, sep="\t") for p in paths.values() if existing(p) is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per readout: its labels against W_U's, a probe's held-out scores."""
    rows = []
    for _, s in summary.iterrows():
        row = {
            "readout": s["readout"],
            "kind": s["kind"],
            "definition": s["definition"],
            "classes": int(s["classes"]),
            "k": int(s["k"]),
            "cos² with W_U output": s["mean_cos2"],
            "random": s["random_mean_cos2"],
            "smallest angle (°)": s["smallest_angle_deg"],
            "rank": int(s["rank"]),
        }
        if pd.notna(s.get("jacobian_split_half_cos2", float("nan"))):
            row["split-half cos²"] = s["jacobian_split_half_cos2"]
        if pd.notna(s.get("heldout_accuracy", float("nan"))):
            row.update(
                {
                    "held-out accuracy": s["heldout_accuracy"],
                    "balanced": s["heldout_balanced_accuracy"],
                    "ECE": s["heldout_ece"],
                    "majority": s["heldout_majority_share"],
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def cell_table(
    fidelity: pd.DataFrame, ablation: pd.DataFrame, verdicts: pd.DataFrame, corpus: str
) -> pd.DataFrame:
    """Per readout, layer and mode: fidelity, the cells, and the two paired verdicts."""
    out = []
    own = fidelity[fidelity["corpus"] == corpus]
    for (readout, layer, mode), part in ablation.groupby(["readout", "layer", "mode"], sort=False):
        kl = part.set_index("subspace")["kl"]
        fid = own[(own["readout"] == readout) & (own["layer"] == layer)].set_index("view")
        row = {
            "readout": readout,
            "layer": int(layer),
            "mode": mode,
            "lens KL": _interval(fid.loc["tuned"]) if "tuned" in fid.index else "",
            "identity KL": fid["kl"].get("identity"),
            "set mass": (fid["set_mass"].get("tuned") if "set_mass" in fid else float("nan")),
            "KL output": kl.get("output"),
            "KL internal": kl.get("internal"),
            "KL random": kl.get("random"),
        }
        for other in ("internal", "random"):
            v = verdicts[
                (verdicts["readout"] == readout)
                & (verdicts["layer"] == layer)
                & (verdicts["mode"] == mode)
                & (verdicts["comparison"] == f"output - {other}")
            ]
            if len(v):
                v = v.iloc[0]
                draws = (
                    f", draws {words.number(v['draw_min'])}–{words.number(v['draw_max'])}"
                    if other == "random"
                    else ""
                )
                row[f"output − {other}"] = (
                    f"{_interval(v, 'diff', 'lo', 'hi')}; {int(v['n_above'])} of "
                    f"{int(v['n_sequences'])} above, p_adj {words.number(v['p_adjusted'])}"
                    f"{draws}: {v['verdict']}"
                )
        out.append(row)
    return pd.DataFrame(out)


def _interval(row, value: str = "kl", lo: str = "kl_lo", hi: str = "kl_hi") -> str:
    return f"{words.number(row[value])} [{words.number(row[lo])}, {words.number(row[hi])}]"


def plot(
    summary: pd.DataFrame,
    fidelity: pd.DataFrame,
    verdicts: pd.DataFrame,
    corpus: str,
    title: str,
    path: str | Path,
) -> None:
    """Left: fidelity KL by layer per readout (lens solid, identity dotted). Middle: output −
    internal per readout (the first mode, paired 95% intervals). Right: probes' held-out
    accuracy through the lens by layer, one line style per corpus."""
    import seaborn as sns

    from lensspace.plots import plt, save, style

    style()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(9.5, 2.8), layout="constrained")
    names = list(summary["readout"])
    colors = dict(zip(names, sns.color_palette("colorblind", len(names))))
    own = fidelity[fidelity["corpus"] == corpus]
    for name in names:
        for view, ls in (("tuned", "-"), ("identity", ":")):
            part = own[(own["readout"] == name) & (own["view"] == view)].sort_values("layer")
            left.plot(
                part["layer"],
                part["kl"].clip(lower=1e-6),
                color=colors[name],
                ls=ls,
                marker="o",
                ms=3,
                lw=1.1,
                label=name if view == "tuned" else None,
            )
        v = verdicts[
            (verdicts["readout"] == name)
            & (verdicts["mode"] == verdicts["mode"].iloc[0])
            & (verdicts["comparison"] == "output - internal")
        ].sort_values("layer")
        middle.errorbar(
            v["layer"],
            v["diff"],
            yerr=[v["diff"] - v["lo"], v["hi"] - v["diff"]],
            color=colors[name],
            marker="o",
            ms=3,
            lw=1.0,
            capsize=1.5,
            label=name,
        )
    probes = summary[summary["kind"] == "probe"]["readout"]
    corpora = list(dict.fromkeys(fidelity["corpus"]))
    styles = dict(zip(corpora, ("-", "--", "-.", ":")))
    for name in probes:
        for c in corpora:
            part = fidelity[
                (fidelity["readout"] == name)
                & (fidelity["corpus"] == c)
                & (fidelity["view"] == "tuned")
            ].sort_values("layer")
            if "accuracy" in part and part["accuracy"].notna().any():
                right.plot(
                    part["layer"],
                    part["accuracy"],
                    color=colors[name],
                    ls=styles.get(c, "-"),
                    marker="o",
                    ms=3,
                    lw=1.0,
                    label=f"{name}, {c}",
                )
    left.set_yscale("log")
    left.set_xlabel("layer")
    left.set_ylabel("KL(readout(model) ‖ readout(view)), nats")
    left.legend(fontsize=6, title="solid: lens; dotted: identity", title_fontsize=6)
    middle.axhline(0, color="#7f8c8d", lw=0.8)
    middle.set_xlabel("layer")
    middle.set_ylabel(f"KL(output) − KL(internal), {verdicts['mode'].iloc[0]} mode")
    middle.legend(fontsize=6)
    right.set_xlabel("layer")
    right.set_ylabel("probe accuracy through the lens")
    right.set_ylim(0, 1.02)
    if len(probes):
        right.legend(fontsize=5)
    fig.suptitle(title, fontsize=8)
    save(fig, path)


def _frames(files: dict) -> tuple[pd.DataFrame, ...]:
    return tuple(
        read_all(files.get(key, {})) for key in ("summary", "fidelity", "ablation", "verdicts")
    )


def section(run: str, files: dict, context: Context) -> Section | None:
    summary, fidelity, ablation, verdicts = _frames(files)
    if summary.empty:
        return None
    corpus = context.spec(run)["corpus"]
    blocks: list = [Text(" ".join(describe(summary, fidelity, verdicts, corpus)))]
    blocks += figure(
        files.get("figure"),
        (
            f"Readouts, {run}: left, held-out KL of each readout of the lens against the same "
            f"readout of the model's own state, on {corpus}, by layer (dotted: the identity "
            "view); middle, KL(ablate output) − KL(ablate internal) of each readout's own labels "
            "with paired 95% intervals; right, the probes' accuracy through the lens by layer "
            "on each corpus."
        ),
    )
    blocks.append(
        Table(
            summary_table(summary),
            "Each readout's labels against W_U's, and a probe's held-out scores.",
        )
    )
    blocks.append(
        Table(
            cell_table(fidelity, ablation, verdicts, corpus),
            "Per readout, layer and mode: fidelity, the H0 cells of the readout's labels and "
            "the paired, Holm-corrected verdicts.",
            markdown_path=files.get("table"),
            collapsed=True,
        )
    )
    return Section("readouts", "Readouts in place of the unembedding", blocks)


def _counts(verdicts: pd.DataFrame, name: str, other: str) -> tuple[int, int, int]:
    """(holds, reversed, cells) of one readout's output − ``other`` verdicts."""
    v = verdicts[(verdicts["readout"] == name) & (verdicts["comparison"] == f"output - {other}")]
    return int((v["verdict"] == "holds").sum()), int((v["verdict"] == "reversed").sum()), len(v)


def _separation(verdicts: pd.DataFrame, name: str) -> str:
    """How the readout's output ablation compares with its internal and random ones."""
    held, rev, n = _counts(verdicts, name, "internal")
    if not n:
        return (
            "its rank is 1, so it has no internal or random subspace to compare its output "
            "ablation with"
        )
    above, below, m = _counts(verdicts, name, "random")
    return (
        f"ablating its output subspace costs more than its internal one on a significant "
        f"majority of sequences in {held} of {n} layer-mode cells and less in {rev}, and more "
        f"than every random draw in {above} of {m} (less in {below})"
    )


def _readability(fidelity: pd.DataFrame, name: str) -> str:
    """A probe's balanced accuracy through the lens per corpus, by layer ("" for others)."""
    if "balanced_accuracy" not in fidelity:
        return ""
    part = fidelity[(fidelity["readout"] == name) & (fidelity["view"] == "tuned")]
    part = part[part["balanced_accuracy"].notna()]
    if part.empty:
        return ""
    said = []
    for corpus, rows in part.groupby("corpus", sort=False):
        rows = rows.sort_values("layer")
        values = ", ".join(f"{v:.2f}" for v in rows["balanced_accuracy"])
        said.append(f"{corpus} {values}")
    layers = ", ".join(str(int(v)) for v in sorted(part["layer"].unique()))
    return f"({layers}): " + "; ".join(said)


def describe(
    summary: pd.DataFrame, fidelity: pd.DataFrame, verdicts: pd.DataFrame, corpus: str
) -> list[str]:
    """One sentence per readout, from its tables: verdicts, labels against W_U's, fidelity."""
    lines = []
    for _, s in summary.iterrows():
        name = s["readout"]
        fid = fidelity[
            (fidelity["readout"] == name)
            & (fidelity["corpus"] == corpus)
            & (fidelity["view"] == "tuned")
        ]
        overlap = (
            s["mean_cos2"] / s["random_mean_cos2"] if s["random_mean_cos2"] > 0 else float("nan")
        )
        text = (
            f"{name} ({s['kind']}: {s['definition']}, k = {int(s['k'])}): "
            f"{_separation(verdicts, name)}; its output subspace overlaps W_U's "
            f"{words.times(overlap)} as much as a random one (mean cos² {s['mean_cos2']:.2f} "
            f"against {s['random_mean_cos2']:.2f})"
        )
        if pd.notna(s.get("jacobian_split_half_cos2", float("nan"))):
            text += (
                f", and its labels from either half of the Jacobian's sequences agree at mean "
                f"cos² {s['jacobian_split_half_cos2']:.2f} (chance 0.50)"
            )
        if len(fid) == 1:
            text += (
                f"; through the lens its KL to the model's own readout is "
                f"{words.number(fid['kl'].iloc[0])} ({words.layers(fid['layer'])})"
            )
        elif len(fid):
            text += (
                f"; through the lens its KL to the model's own readout is "
                f"{words.number(fid['kl'].max())} at worst and {words.number(fid['kl'].min())} at "
                f"best ({words.layers(fid['layer'])})"
            )
        readable = _readability(fidelity, name)
        if readable:
            text += f"; its balanced accuracy through the lens, by layer, {readable}"
        if pd.notna(s.get("heldout_accuracy", float("nan"))):
            if s["definition"] == "which corpus":  # fitted to a uniform prior over its classes
                text += (
                    f"; held out its balanced accuracy is {s['heldout_balanced_accuracy']:.1%} "
                    f"(chance {1 / s['classes']:.1%})"
                )
            else:
                text += (
                    f"; held out it is {s['heldout_accuracy']:.1%} accurate (majority class "
                    f"{s['heldout_majority_share']:.1%}, balanced accuracy "
                    f"{s['heldout_balanced_accuracy']:.1%}, ECE {s['heldout_ece']:.3f})"
                )
        lines.append(text + ".")
    lines.append(
        "Labels are the right singular vectors of each readout's class-centred linear map on the "
        "normalised residual (a back half: W_U times its average Jacobian, the final norm's scale "
        "frozen); a readout of rank r is ablated along k = r // 2 directions of its row space, "
        "its random control drawn from the same row space. Verdicts: the exact sign test of "
        "per-sequence differences, Holm-corrected per readout."
    )
    return lines


def finding(run: str, files: dict, context: Context) -> Finding | None:
    """Which readouts separate output from internal, and whether their outputs are W_U's."""
    summary, _, _, verdicts = _frames(files)
    if summary.empty:
        return None
    parts = []
    for _, s in summary.iterrows():
        held, rev, n = _counts(verdicts, s["readout"], "internal")
        said = f"output > internal in {held} of {n} cells, < in {rev}" if n else "rank 1"
        parts.append(
            f"{s['readout']}: {said} (cos² of its output subspace with W_U's "
            f"{s['mean_cos2']:.2f}, random {s['random_mean_cos2']:.2f})"
        )
    return Finding(
        "Readouts",
        "With another readout in place of the unembedding, " + "; ".join(parts) + ".",
    )
