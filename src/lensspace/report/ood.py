"""Out of distribution: where the lens and the H0 verdict survive the shift to other corpora."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.h0 import H0
from lensspace.report.sections import Context, existing, figure

LEGEND = (
    "Held-out KL(p_final ‖ p_lens) of the tuned and logit lens, and the seed-layout H0 cells "
    "(unembed basis, k = d/2, pre_norm): KL of ablating the output, internal and random subspace "
    "(mean mode: the mean over the corpus's own other documents); output − internal with its "
    "paired 95% bootstrap-t interval over the eval corpus's sequences, and its verdict: the "
    "exact two-sided sign test of the per-sequence differences (is the median difference 0), "
    "Holm-corrected over the corpus's layers and modes."
)


def comparison_table(frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> pd.DataFrame:
    """Per corpus, layer and mode: tuned / logit lens KL and the seed-layout H0 cells.

    ``frames``: corpus -> (lens_eval, ablation); in-distribution first. The paired interval of
    output − internal is shown where the ablation table carries it (the eval corpora's).
    """
    out = []
    seed_k = int(
        list(frames.values())[-1][1]["k"].iloc[0]
    )  # an eval corpus runs the seed layout's k = d/2 only
    for corpus, (lens_eval, ablation) in frames.items():
        lens = lens_eval.pivot(index="layer", columns="lens", values="kl")
        cells = ablation[
            (ablation["basis"].isin(["unembed", "random"]))
            & (ablation["site"] == "pre_norm")
            & (ablation["k"] == seed_k)
        ]
        for (layer, mode), part in cells.groupby(["layer", "mode"], sort=True):
            kl = part.set_index("subspace")["kl"]
            row = part[part["subspace"] == "output"].iloc[0]
            diff = kl.get("output", float("nan")) - kl.get("internal", float("nan"))
            shown = (
                f"{diff:.3f} [{row['output_minus_internal_lo']:.3f}, "
                f"{row['output_minus_internal_hi']:.3f}]"
                if "output_minus_internal_lo" in row and pd.notna(row["output_minus_internal_lo"])
                else f"{diff:.3f}"
            )
            out.append(
                {
                    "corpus": corpus,
                    "layer": int(layer),
                    "mode": mode,
                    "tuned lens KL": lens["tuned"].get(layer),
                    "logit lens KL": lens["logit"].get(layer),
                    "KL output": kl.get("output"),
                    "KL internal": kl.get("internal"),
                    "KL random": kl.get("random"),
                    "output − internal": shown,
                    "verdict (Holm)": row["verdict"] if "verdict" in row else "",
                }
            )
    return pd.DataFrame(out)


def plot(
    frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]], title: str, path: str | Path
) -> None:
    """Left: tuned (solid) and logit (dotted) lens KL by layer per corpus. Right: output −
    internal (zero mode)."""
    import seaborn as sns

    from lensspace.plots import plt, save, style

    style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 2.8), layout="constrained")
    colors = sns.color_palette("colorblind", len(frames))
    for color, (corpus, (lens_eval, ablation)) in zip(colors, frames.items()):
        for lens, ls in (("tuned", "-"), ("logit", ":")):
            part = lens_eval[lens_eval["lens"] == lens].sort_values("layer")
            left.plot(
                part["layer"],
                part["kl"],
                color=color,
                ls=ls,
                lw=1.2,
                label=corpus if lens == "tuned" else None,
            )
            if lens == "tuned":
                left.fill_between(
                    part["layer"], part["kl_lo"], part["kl_hi"], color=color, alpha=0.2, lw=0
                )
        cells = ablation[
            (ablation["basis"] == "unembed")
            & (ablation["site"] == "pre_norm")
            & (ablation["mode"] == "zero")
            & (ablation["k"] == ablation["k"].max())
        ]
        wide = cells.pivot(index="layer", columns="subspace", values="kl").sort_index()
        diff = wide["output"] - wide["internal"]
        if "output_minus_internal_lo" in cells:
            bounds = cells[cells["subspace"] == "output"].set_index("layer").sort_index()
            right.errorbar(
                diff.index,
                diff,
                yerr=[
                    diff - bounds["output_minus_internal_lo"],
                    bounds["output_minus_internal_hi"] - diff,
                ],
                color=color,
                marker="o",
                ms=3,
                lw=1.0,
                capsize=1.5,
                label=corpus,
            )
        else:
            right.plot(diff.index, diff, color=color, marker="o", ms=3, lw=1.0, label=corpus)
    left.set_yscale("log")
    left.set_xlabel("layer")
    left.set_ylabel("KL(p_final ‖ p_lens), nats")
    left.legend(fontsize=6, title="solid: tuned; dotted: logit", title_fontsize=6)
    right.axhline(0, color="#7f8c8d", lw=0.8)
    right.set_xlabel("layer")
    right.set_ylabel("KL(output) − KL(internal), zero mode")
    right.legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    save(fig, path)


def corpora(files: dict) -> list[str]:
    """The eval corpora whose results exist, in the registered order."""
    return [c for c, path in files.get("ablation", {}).items() if existing(path) is not None]


def read(files: dict, key: str, corpus: str) -> pd.DataFrame:
    return pd.read_csv(files[key][corpus], sep="\t")


def home_lens(run: str, context: Context) -> pd.DataFrame | None:
    """The run's own (in-distribution) lens evaluation, from the lens experiment's files."""
    path = existing(context.files("lens", run).get("lens_eval"))
    return pd.read_csv(path, sep="\t") if path is not None else None


def shift(lens: pd.DataFrame, home: pd.DataFrame | None) -> float | None:
    """The tuned lens's KL on a corpus over its in-distribution KL, median over layers."""
    if home is None:
        return None
    wide = lens.pivot(index="layer", columns="lens", values="kl")
    mine = home.pivot(index="layer", columns="lens", values="kl")["tuned"]
    return (wide["tuned"] / mine).median()


def section(run: str, files: dict, context: Context) -> Section | None:
    names = corpora(files)
    if not names:
        return None
    home = home_lens(run, context)
    lines = []
    for corpus in names:
        lens, ablation = read(files, "lens_eval", corpus), read(files, "ablation", corpus)
        wide = lens.pivot(index="layer", columns="lens", values="kl")
        better = int((wide["tuned"] < wide["logit"]).sum())
        ratio = shift(lens, home)
        moved = (
            f"; its KL is {ratio:.1f}× the in-distribution KL (median over layers)"
            if ratio is not None
            else ""
        )
        cells = ablation[(ablation["subspace"] == "output") & (ablation["basis"] == "unembed")]
        verdicts = []
        for mode, part in cells.groupby("mode", sort=False):
            above = part[part["verdict"] == "holds"]["layer"]
            below = part[part["verdict"] == "reversed"]["layer"]
            verdicts.append(
                f"{mode} mode: output > internal at {len(above)} of {len(part)} layers, "
                f"internal > output at {len(below)}"
            )
        code = ""
        sample_path = existing(files.get("sample", {}).get(corpus))
        if sample_path is not None:
            sample = pd.read_csv(sample_path, sep="\t")
            shares = sample["docstring_comment_share"].dropna()
            if len(shares):
                code = (
                    f" Docstrings and comments are {shares.mean():.0%} of the evaluated windows' "
                    f"characters (mean over {len(shares)} windows) against "
                    f"{sample['corpus_docstring_comment_share'].iloc[0]:.0%} of the corpus's."
                )
        lines.append(
            f"{corpus} ({words.tokens(lens)} held-out tokens): the tuned lens beats the logit "
            f"lens at {better} of {len(wide)} layers{moved}. H0 (unembed, k = d/2, pre_norm): "
            + "; ".join(verdicts)
            + "."
            + code
        )
    lines.append(
        "Each held-out sequence is a window at a seeded offset of its own document. Verdicts: the "
        "exact two-sided sign test of the per-sequence KL(ablate output) − KL(ablate internal) "
        "(does one ablation cost more on more sequences than chance allows; nominal size at any "
        "number of sequences), Holm-corrected over the corpus's layers and modes (family-wise "
        "0.05); the intervals are of the mean difference. The "
        "mean mode replaces a component by its mean over the corpus's own other documents. Eval "
        "corpora are tokenized with the run's tokenizer and refused if they share a token n-gram "
        "with its training tokens."
    )
    interval = words.interval(context.n_resamples)
    blocks: list = [Text(" ".join(lines))]
    blocks += figure(
        files.get("figure"),
        (
            f"Out of distribution, {run}: left, held-out lens KL by layer for the run's "
            f"own corpus and {', '.join(names)} (tuned solid, band: {interval}; logit "
            "dotted); right, KL(ablate output) − KL(ablate internal), zero mode, unembed "
            "basis, k = d/2, pre_norm, with paired 95% intervals."
        ),
    )
    frames = {}
    in_distribution = existing(context.files("h0", run).get("ablation"))
    if home is not None and in_distribution is not None:
        frames[f"{context.spec(run)['corpus']} (in distribution)"] = (
            home,
            pd.read_csv(in_distribution, sep="\t"),
        )
    for corpus in names:
        frames[corpus] = (read(files, "lens_eval", corpus), read(files, "ablation", corpus))
    blocks.append(
        Table(
            comparison_table(frames),
            (
                "Per corpus, layer and mode: tuned and logit lens KL and the seed-layout H0 cells "
                "(random: mean of its draws); output − internal with its paired 95% interval "
                "where computed (the eval corpora)."
            ),
            markdown_path=files.get("table"),
            collapsed=True,
        )
    )
    return Section("ood", "Out of distribution", blocks)


def finding(run: str, files: dict, context: Context) -> Finding | None:
    """Per eval corpus: how far the lens's KL moves, and which subspace costs more there."""
    home = home_lens(run, context)
    parts = []
    for corpus in corpora(files):
        ratio = shift(read(files, "lens_eval", corpus), home)
        lens = (
            f"the tuned lens's KL is {words.times(ratio)} its in-distribution KL (median over "
            "layers); "
            if ratio is not None
            else ""
        )
        said = H0.headline(read(files, "ablation", corpus))
        if said:
            said = said[0].lower() + said[1:].rstrip(".")
        parts.append(f"on {corpus} {lens}{said or 'no H0 cell'}")
    if not parts:
        return None
    sentence = "; ".join(parts)
    return Finding("Out of distribution", sentence[0].upper() + sentence[1:] + ".")
