"""What the ablation experiments (H0, H1, H2) share: their section (the table in the original
layout with the published numbers where the run names a reference, the figure with a caption
generated from the data, the robustness grid) and their findings (a plain sentence of which
subspace costs more, then the robustness verdicts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from lensspace import robustness, tables
from lensspace.errors import LensspaceError
from lensspace.report import words
from lensspace.report.blocks import Finding, Grid, Section, Table, Text
from lensspace.report.sections import Context, existing, figure

# A hook of one experiment: (run, files, context, ablation table) -> blocks, or -> finding lines.
Hook = Callable[[str, dict, Context, pd.DataFrame], list]


@dataclass(frozen=True)
class AblationExperiment:
    """An experiment whose results follow the ablation columns of the output contract.

    Its registered files: ``ablation`` (required), ``figure``, ``comparisons`` (robustness
    verdicts), ``table`` (the Markdown of the original layout) and those its hooks read.
    """

    key: str  # the section's anchor
    title: str
    where: str  # where the ablation happens
    measure: str  # what the KL compares
    site: str  # the seed's own cell: the site of the original table and of the findings
    basis: str = "unembed"  # ... and its basis
    seed_table: bool = True  # show the table in the original layout
    summary: Hook | None = None  # blocks after the original table
    more_findings: Hook | None = None  # finding lines after the verdicts
    subspace_words: tuple = ()  # (subspace, words) where the SVD is not of W_U
    names: tuple = (("output", "output subspace"), ("internal", "internal subspace"))
    extra_tables: tuple = ()  # (file key, caption, collapsed)
    extra_figures: tuple = ()  # (file key, caption)

    # ------------------------------------------------------------ the section
    def section(self, run: str, files: dict, context: Context) -> Section | None:
        path = existing(files.get("ablation"))
        if path is None:
            return None
        ablation = pd.read_csv(path, sep="\t")
        section = Section(self.key, self.title)
        if self.seed_table:
            section.blocks += self.original_layout(run, files, context, ablation)
        if self.summary is not None:
            section.blocks += self.summary(run, files, context, ablation)
        section.blocks += figure(files.get("figure"), self.caption(run, context, ablation))
        verdicts = self.verdicts(files)
        if not verdicts.empty:
            section.blocks.append(
                Grid(verdicts, self.robustness_caption(run, files["comparisons"], verdicts))
            )
        for key, caption in self.extra_figures:
            section.blocks += figure(files.get(key), f"{caption} Run {run}.")
        for key, caption, collapsed in self.extra_tables:
            extra = existing(files.get(key))
            if extra is not None:
                frame = pd.read_csv(extra, sep="\t")
                section.blocks.append(
                    Table(
                        frame,
                        f"{caption} Run {run}; {len(frame)} rows ({files[key]}).",
                        collapsed=collapsed,
                    )
                )
        return section

    @staticmethod
    def verdicts(files: dict) -> pd.DataFrame:
        path = existing(files.get("comparisons"))
        return pd.read_csv(path, sep="\t") if path is not None else pd.DataFrame()

    def caption(self, run: str, context: Context, ablation: pd.DataFrame) -> str:
        subspaces = list(dict.fromkeys(ablation["subspace"]))
        bases = [b for b in dict.fromkeys(ablation["basis"]) if not b.startswith("random")]
        draws = int(ablation["n_draws"].max()) if "n_draws" in ablation else 1
        ks = sorted(set(int(k) for k in ablation["k"]), reverse=True)
        names = {**words.SUBSPACE_TEXT, **dict(self.subspace_words)}
        return (
            f"{self.title}, {run}. Ablated: {words.listing(subspaces, names)}; "
            f"k = {', '.join(map(str, ks))}; bases: {words.listing(bases, words.BASIS_TEXT)}. "
            f"Where: {self.where}, at {words.layers(ablation['layer'])}; sites: "
            f"{words.listing(dict.fromkeys(ablation['site']), words.SITE_TEXT)}. "
            f"How: {words.listing(dict.fromkeys(ablation['mode']), words.MODE_TEXT)}. "
            f"Measure: {self.measure}, nats, mean over {words.tokens(ablation)} held-out token "
            f"positions. Bands: {words.interval(context.n_resamples)}. Panels: one per basis "
            "(columns) and k, mode, site (rows); the random control (dashed; one line per "
            "panel: random_<basis> where the grid has it, else random) is the mean of "
            f"{draws} independent draws"
            + (
                ", its band the range of the draws' means (draw_min / draw_max of the TSV)"
                if draws > 1
                else ""
            )
            + "; edit_rel in the TSV is the ablation's mean relative size ||x' − x|| / ||x||."
        )

    def robustness_caption(self, run: str, path, verdicts: pd.DataFrame) -> str:
        return (
            f'Robustness of {self.title}, {run}: for each conclusion "A > B" (ablating A '
            "raises the KL more than ablating B) and each variant, per layer. "
            f"{robustness.legend(verdicts)} Sequences per comparison: "
            f"{int(verdicts['n_sequences'].max())}; every comparison with its difference, "
            f"interval and p-values: {path}."
        )

    def original_layout(
        self, run: str, files: dict, context: Context, ablation: pd.DataFrame
    ) -> list:
        d_model = context.d_model(run)
        if d_model is None:
            return [
                Text(
                    "The original table layout needs d_model of model "
                    f"'{context.spec(run)['model']}'."
                )
            ]
        name = context.reference_name(run, self.key)
        reference = (
            tables.load_reference(context.reference, name) if name and context.reference else None
        )
        try:
            site = {} if self.site == "pre_norm" else {"site": self.site}  # pre_norm: the default
            frame = tables.seed_layout(ablation, k=d_model // 2, reference=reference, **site)
        except LensspaceError as err:
            return [Text(f"Original layout not available: {err}")]
        caption = (
            f"{self.title} in the original layout, {run}: k = {d_model // 2} of {d_model} "
            f"(d/2), basis unembed, zero ablation (mean ablation of the same cells in the last "
            f"columns, where the grid has it), site {self.site}. Measure: {self.measure}, nats, "
            f"mean over {words.tokens(ablation)} held-out tokens; "
            f"{words.interval(context.n_resamples)}."
        )
        if name:
            caption += f" Published: the seed study's table {name}; Δ = reproduced − published."
        return [Table(frame, caption, existing(files.get("table")))]

    # ------------------------------------------------------------ the findings
    def finding(self, run: str, files: dict, context: Context) -> Finding | None:
        path = existing(files.get("ablation"))
        if path is None:
            return None
        ablation = pd.read_csv(path, sep="\t")
        sentence = self.headline(ablation)
        details = []
        verdicts = self.verdicts(files)
        if not verdicts.empty:
            said = "; ".join(
                f'"{c}" {verdict_counts(verdicts, c)}'
                for c in dict.fromkeys(verdicts["conclusion"])
            )
            details.append(
                f"{said}.{self.seed_verdicts(verdicts)} Each verdict: "
                f"{robustness.PROCEDURE} (family: the {len(verdicts)} comparisons of this "
                "experiment)."
            )
        if self.more_findings is not None:
            details += self.more_findings(run, files, context, ablation)
        if sentence is None and not details:
            return None
        return Finding(self.title, sentence or "", details)

    def seed_verdicts(self, verdicts: pd.DataFrame) -> str:
        """The verdict of "output > internal" in the seed's own cell (unembed, zero), by layer."""
        cell = verdicts[
            (verdicts["conclusion"] == "output > internal")
            & (verdicts["basis"] == "unembed")
            & (verdicts["mode"] == "zero")
            & (verdicts["site"] == self.site)
        ]
        cell = cell[cell["k"] == cell["k"].max()] if not cell.empty else cell
        if cell.empty:
            return ""
        by_verdict = {
            v: sorted(int(x) for x in cell.loc[cell["verdict"] == v, "layer"])
            for v in robustness.VERDICTS
        }
        parts = [f"{v} at {words.layers(found)}" for v, found in by_verdict.items() if found]
        return (
            f" In the seed's own cell (basis unembed, zero ablation, {self.site}): "
            + "; ".join(parts)
            + "."
        )

    def seed_cell(self, ablation: pd.DataFrame) -> pd.DataFrame:
        """The rows of the seed's own cell: its basis, zero ablation, its site, the largest k
        (the first basis, mode or site the table has where it lacks the seed's)."""
        bases = [b for b in dict.fromkeys(ablation["basis"]) if not b.startswith("random")]
        if not bases:
            return ablation.iloc[:0]
        basis = self.basis if self.basis in bases else bases[0]
        cell = ablation[ablation["basis"] == basis]
        mode = "zero" if "zero" in set(cell["mode"]) else cell["mode"].iloc[0]
        site = self.site if self.site in set(cell["site"]) else cell["site"].iloc[0]
        cell = cell[(cell["mode"] == mode) & (cell["site"] == site)]
        return cell[cell["k"] == cell["k"].max()]

    def headline(self, ablation: pd.DataFrame) -> str | None:
        """Which subspace costs more KL to ablate, by how much and at which layers (the seed's
        cell of ``ablation``), as one plain sentence; None where the cell lacks either."""
        cell = self.seed_cell(ablation)
        wide = cell.pivot_table(index="layer", columns="subspace", values="kl", aggfunc="mean")
        if not {"output", "internal"} <= set(wide.columns):
            return None
        row = cell.iloc[0]
        where = f"basis {row['basis']}, {row['mode']} ablation, {row['site']}, k = {row['k']}"
        return compare(wide["output"], wide["internal"], dict(self.names), where)


def compare(output: pd.Series, internal: pd.Series, names: dict, cell: str = "") -> str:
    """A plain sentence of which of two per-layer KLs (indexed by layer) is larger, by how much
    and where; ``cell`` (which ablation they are) goes into its closing parenthesis."""
    more = {"output": output.index[output > internal], "internal": output.index[internal > output]}
    n = len(output)
    notes = []
    for first, second in (("output", "internal"), ("internal", "output")):
        if len(more[first]) != n:
            continue
        a, b = (output, internal) if first == "output" else (internal, output)
        sentence = f"Ablating the {names[first]} costs more KL than ablating the {names[second]}"
        if (b > 0).all():
            ratio = a / b
            sentence = (
                f"Ablating the {names[first]} costs {words.times(ratio.median())} the KL of "
                f"ablating the {names[second]}"
            )
            if n > 1:
                notes.append(
                    f"median over layers, from {words.ratio(ratio.min())} to "
                    f"{words.ratio(ratio.max())} times"
                )
        sentence += f" at {'every one of ' if n > 1 else ''}{words.layers(output.index)}"
        break
    else:
        major, minor = sorted(("output", "internal"), key=lambda side: -len(more[side]))
        sentence = (
            f"Ablating the {names[major]} costs more KL than ablating the {names[minor]} at "
            f"{len(more[major])} of {n} layers ({words.layers(more[major])})"
        )
        if len(more[minor]):
            sentence += f", less at {len(more[minor])} ({words.layers(more[minor])})"
        ties = n - len(more["output"]) - len(more["internal"])
        if ties:
            sentence += f", the same at {ties}"
    notes += [cell] if cell else []
    return sentence + (f" ({'; '.join(notes)})" if notes else "") + "."


def verdict_counts(verdicts: pd.DataFrame, conclusion: str) -> str:
    part = verdicts[verdicts["conclusion"] == conclusion]
    counts = part["verdict"].value_counts()
    return (
        f"holds in {counts.get(robustness.HOLDS, 0)}, reversed in "
        f"{counts.get(robustness.REVERSED, 0)}, not separable in "
        f"{counts.get(robustness.NOT_SEPARABLE, 0)} of {len(part)} cells"
    )
