"""Out of distribution: where the lens and the H0 verdict survive the shift to other corpora."""

from __future__ import annotations

import pandas as pd

from lensspace import tables
from lensspace.report import words
from lensspace.report.blocks import Finding, Section, Table, Text
from lensspace.report.h0 import H0
from lensspace.report.sections import Context, existing, figure


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
        lines.append(
            f"{corpus} ({words.tokens(lens)} held-out tokens): the tuned lens beats the logit "
            f"lens at {better} of {len(wide)} layers{moved}. H0 (unembed, k = d/2, pre_norm): "
            + "; ".join(verdicts)
            + "."
        )
    lines.append(
        "Verdicts: paired bootstrap-t test of KL(ablate output) − KL(ablate internal) over the "
        "eval corpus's sequences, Holm-corrected over the corpus's layers and modes (family-wise "
        "0.05); the mean mode keeps the in-distribution training means. Eval corpora are "
        "tokenized with the run's tokenizer and refused if they share a token n-gram with its "
        "training tokens."
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
            tables.ood_table(frames),
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
