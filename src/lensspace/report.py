"""The study's report: one self-contained HTML page built from a finished run's results.

The page is data-driven. Each run gets the sections of :data:`SECTIONS` whose files exist;
a section builder takes a :class:`RunContext` and returns a :class:`Section` (or ``None``
when its files are absent). Ablation experiments (H0, H1, ...) share one builder,
parametrised by an :class:`AblationExperiment`: the table in the original layout (with the
published numbers where the run names a reference), the figure with a caption generated
from the data, and the robustness grid. Every number on the page is read from the results.

To add a section: write ``def my_section(ctx: RunContext) -> Section | None`` that reads
``ctx.path(...)`` files and returns blocks (:class:`Figure`, :class:`Table`, :class:`Text`,
:class:`Grid`), and append it to :data:`SECTIONS`.
"""

from __future__ import annotations

import base64
import html
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from lensspace import provenance, robustness, tables
from lensspace.errors import LensspaceError

# ---------------------------------------------------------------- words for the variants
BASIS_TEXT = {
    "unembed": "SVD of the raw unembedding W_U",
    "unembed_centered": "SVD of W_U with its vocabulary mean removed and the final norm's gain folded in",
    "lens_pullback": (
        "the lens-space ablation of the unembed subspace carried exactly into the residual "
        "through translator i, h' = h − (I + A_i)^-1 Q Q^T (T_i(h) − c), so that "
        "T_i(h') = ablate(T_i(h))"
    ),
    "random": "seeded random k-dimensional subspaces (the control; independent draws per layer)",
    "random_lens_pullback": "the lens_pullback operation on seeded random lens-space subspaces (its control)",
    "embed": "SVD of the token embedding W_E",
}
MODE_TEXT = {
    "zero": "zero (the component is projected out)",
    "mean": "mean (the component is replaced by its training-set mean)",
}
SITE_TEXT = {
    "pre_norm": "pre_norm (before the final norm)",
    "post_norm": "post_norm (after the final norm, its scale frozen from the intact vector)",
    "residual": "residual (the residual stream h_i itself)",
    "embedding": "embedding (the token embedding, at the embedding lens's input)",
}
SUBSPACE_TEXT = {
    "output": "output (top-k right singular vectors)",
    "internal": "internal (bottom-k right singular vectors)",
    "random": "random (seeded k-dim control)",
}


# ---------------------------------------------------------------- page blocks
@dataclass
class Text:
    text: str
    html: bool = False


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str
    markdown_path: Path | None = None  # where the same table is written as Markdown, if anywhere
    collapsed: bool = False  # long tables: shown on demand
    digits: int | None = None  # fixed decimals (default: :func:`number`)
    with_markdown: bool = True  # offer the table's Markdown under it


@dataclass
class Grid:
    """A robustness grid: verdicts per conclusion x variant x layer."""

    verdicts: pd.DataFrame
    caption: str


@dataclass
class Section:
    key: str
    title: str
    blocks: list = field(default_factory=list)


@dataclass
class RunContext:
    run: str
    config: dict
    results: Path
    resources: Path = Path("resources")
    reference: Path | None = None  # the published numbers (reference/seed_tables.tsv)

    @property
    def spec(self) -> dict:
        return self.config["runs"][self.run]

    @property
    def model(self) -> dict:
        return self.config["models"][self.spec["model"]]

    def path(self, *parts: str) -> Path:
        return self.results.joinpath(self.run, *parts)

    def figure(self, name: str) -> Path:
        return self.results / "figures" / f"{name}_{self.run}.png"

    def table(self, name: str) -> Path:
        return self.results / "tables" / f"{name}_{self.run}.md"

    def reference_name(self, key: str) -> str:
        return self.spec.get("reference", {}).get(key, "")

    @property
    def n_resamples(self) -> int:
        return int(self.config.get("bootstrap", {}).get("n_resamples", 0))

    @property
    def d_model(self) -> int | None:
        manifest = self.resources / "models" / self.spec["model"] / "lensspace-model.json"
        if manifest.exists():
            return int(json.loads(manifest.read_text())["d_model"])
        return self.model.get("d_model")


# ---------------------------------------------------------------- shared phrasing
def number(value: float) -> str:
    """KL values: three decimals, or three significant digits below 0.01 (tiny models)."""
    if pd.isna(value):
        return ""
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


def _tokens(frame: pd.DataFrame) -> str:
    counts = sorted(set(int(n) for n in frame["n_tokens"]))
    return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}–{counts[-1]:,}"


def _interval(ctx: RunContext) -> str:
    return (
        f"95% studentized bootstrap interval over sequences ({ctx.n_resamples:,} resamples)"
        if ctx.n_resamples
        else "95% studentized bootstrap interval over sequences"
    )


def _layers(values) -> str:
    layers = sorted(set(int(v) for v in values))
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}–{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def _listing(values, words: dict) -> str:
    return "; ".join(words.get(v, str(v)) for v in values)


# ---------------------------------------------------------------- sections
def lens_section(ctx: RunContext) -> Section | None:
    path = ctx.path("lens_eval.tsv")
    if not path.exists():
        return None
    frame = pd.read_csv(path, sep="\t")
    wide = frame.pivot(index="layer", columns="lens", values="kl")
    blocks: list = []
    if {"tuned", "logit"} <= set(wide.columns):
        better = int((wide["tuned"] < wide["logit"]).sum())
        blocks.append(
            Text(
                f"The tuned lens has a lower held-out KL than the logit lens at {better} of {len(wide)} "
                f"layers; at the last layer ({wide.index[-1]}) tuned {number(wide['tuned'].iloc[-1])} vs logit "
                f"{number(wide['logit'].iloc[-1])} nats."
            )
        )
    lens = ctx.spec["lens"]
    origin = (
        f"pretrained ({lens.get('id', '')})"
        if lens.get("source") == "pretrained"
        else "trained here (least squares, then KL refinement)"
    )
    caption = (
        f"Lens quality of {ctx.run}: held-out KL(p_final ‖ p_lens) per layer for the tuned lens "
        f"({origin}) and the logit lens (the unembedding applied to h_i directly); "
        f"nats, mean over {_tokens(frame)} held-out token positions; band: {_interval(ctx)}."
    )
    if ctx.figure("lens").exists():
        blocks.append(Figure(ctx.figure("lens"), caption))
    blocks.append(
        Table(
            lens_quality_table(frame),
            "The same, as numbers: KL per layer and lens, with the 95% bootstrap interval.",
        )
    )
    return Section("lens-quality", "Lens quality", blocks)


def lens_quality_table(lens_eval: pd.DataFrame) -> pd.DataFrame:
    """``layer | tuned KL | tuned 95% CI | logit KL | logit 95% CI`` from ``lens_eval.tsv``."""
    out = pd.DataFrame({"layer": sorted(lens_eval["layer"].unique())})
    for lens in dict.fromkeys(lens_eval["lens"]):
        part = lens_eval[lens_eval["lens"] == lens].set_index("layer").reindex(out["layer"])
        out[f"{lens} KL"] = part["kl"].to_numpy()
        out[f"{lens} 95% CI"] = [
            f"[{number(lo)}, {number(hi)}]" for lo, hi in zip(part["kl_lo"], part["kl_hi"])
        ]
    return out


@dataclass(frozen=True)
class AblationExperiment:
    """An experiment whose results follow the ablation columns of the output contract."""

    key: str  # results/{run}/{key}/ablation.tsv, figures/{key}_{run}.png, tables/{key}_{run}.md
    title: str
    where: str  # where the ablation happens
    measure: str  # what the KL compares
    seed_site: str | None = (
        "pre_norm"  # the site of the original table's cell (None: no such table)
    )
    summary: Callable[[RunContext, pd.DataFrame], list] | None = None  # blocks instead of it
    subspace_words: tuple = ()  # (subspace, words) where the SVD is not of W_U
    extra_tables: tuple = ()  # (file name under results/{run}/{key}/, caption, collapsed)
    extra_figures: tuple = ()  # (figure name: figures/{name}_{run}.png, caption)

    def __call__(self, ctx: RunContext) -> Section | None:
        path = ctx.path(self.key, "ablation.tsv")
        if not path.exists():
            return None
        ablation = pd.read_csv(path, sep="\t")
        section = Section(self.key, self.title)
        if self.seed_site is not None:
            section.blocks += self.seed_table(ctx, ablation)
        if self.summary is not None:
            section.blocks += self.summary(ctx, ablation)
        if ctx.figure(self.key).exists():
            section.blocks.append(Figure(ctx.figure(self.key), self.caption(ctx, ablation)))
        comparisons = ctx.path(self.key, "comparisons.tsv")
        verdicts = pd.read_csv(comparisons, sep="\t") if comparisons.exists() else pd.DataFrame()
        if not verdicts.empty:
            section.blocks.append(Grid(verdicts, self.robustness_caption(ctx, verdicts)))
        for name, caption in self.extra_figures:
            if ctx.figure(name).exists():
                section.blocks.append(Figure(ctx.figure(name), f"{caption} Run {ctx.run}."))
        for name, caption, collapsed in self.extra_tables:
            extra = ctx.path(self.key, name)
            if extra.exists():
                frame = pd.read_csv(extra, sep="\t")
                section.blocks.append(
                    Table(
                        frame,
                        f"{caption} Run {ctx.run}; {len(frame)} rows "
                        f"(results/{ctx.run}/{self.key}/{name}).",
                        collapsed=collapsed,
                    )
                )
        return section

    def caption(self, ctx: RunContext, ablation: pd.DataFrame) -> str:
        subspaces = list(dict.fromkeys(ablation["subspace"]))
        bases = [b for b in dict.fromkeys(ablation["basis"]) if not b.startswith("random")]
        draws = int(ablation["n_draws"].max()) if "n_draws" in ablation else 1
        ks = sorted(set(int(k) for k in ablation["k"]), reverse=True)
        words = {**SUBSPACE_TEXT, **dict(self.subspace_words)}
        return (
            f"{self.title}, {ctx.run}. Ablated: {_listing(subspaces, words)}; "
            f"k = {', '.join(map(str, ks))}; bases: {_listing(bases, BASIS_TEXT)}. "
            f"Where: {self.where}, at {_layers(ablation['layer'])}; sites: "
            f"{_listing(dict.fromkeys(ablation['site']), SITE_TEXT)}. "
            f"How: {_listing(dict.fromkeys(ablation['mode']), MODE_TEXT)}. "
            f"Measure: {self.measure}, nats, mean over {_tokens(ablation)} held-out token positions. "
            f"Bands: {_interval(ctx)}. Panels: one per basis (columns) and k, mode, site (rows); "
            f"the random control (dashed) is the mean of {draws} independent draws, their range "
            "in draw_min / draw_max of the TSV; edit_rel there is the ablation's mean relative "
            "size ||x' − x|| / ||x||."
        )

    def robustness_caption(self, ctx: RunContext, verdicts: pd.DataFrame) -> str:
        return (
            f'Robustness of {self.title}, {ctx.run}: for each conclusion "A > B" (ablating A '
            "raises the KL more than ablating B) and each variant, per layer. "
            f"{robustness.legend(verdicts)} Sequences per comparison: "
            f"{int(verdicts['n_sequences'].max())}; every comparison with its difference, interval "
            f"and p-values: results/{ctx.run}/{self.key}/comparisons.tsv."
        )

    def seed_table(self, ctx: RunContext, ablation: pd.DataFrame) -> list:
        d_model = ctx.d_model
        if d_model is None:
            return [
                Text(f"The original table layout needs d_model of model '{ctx.spec['model']}'.")
            ]
        name = ctx.reference_name(self.key)
        reference = tables.load_reference(ctx.reference, name) if name and ctx.reference else None
        try:
            site = (
                {} if self.seed_site == "pre_norm" else {"site": self.seed_site}
            )  # pre_norm: the default
            frame = tables.seed_layout(ablation, k=d_model // 2, reference=reference, **site)
        except LensspaceError as err:
            return [Text(f"Original layout not available: {err}")]
        caption = (
            f"{self.title} in the original layout, {ctx.run}: k = {d_model // 2} of {d_model} "
            f"(d/2), basis unembed, zero ablation (mean ablation of the same cells in the last "
            f"columns, where the grid has it), site {self.seed_site}. Measure: {self.measure}, nats, "
            f"mean over {_tokens(ablation)} held-out tokens; {_interval(ctx)}."
        )
        if name:
            caption += f" Published: the seed study's table {name}; Δ = reproduced − published."
        markdown = ctx.table(self.key)
        return [Table(frame, caption, markdown if markdown.exists() else None)]


def h0_summary(ctx: RunContext, ablation: pd.DataFrame) -> list:
    """Why zero and mean ablation disagree: each subspace's share of the lens vectors' squared
    norm, split into its constant and token-varying parts (shares.tsv)."""
    path = ctx.path("h0", "shares.tsv")
    if not path.exists():
        return []
    shares = pd.read_csv(path, sep="\t")
    cell = shares[
        (shares["basis"] == "unembed")
        & (shares["site"] == "pre_norm")
        & (shares["k"] == shares["k"].max())
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
        f"Zero against mean ablation, {ctx.run}: zero ablation removes a subspace's whole component, "
        "mean ablation only its token-varying part. At layer "
        f"{int(top['layer'])} the {top['subspace']} subspace (basis unembed, k = {int(top['k'])}) holds "
        f"{100 * top['share']:.0f}% of the lens vectors' squared norm before the final norm, "
        f"{100 * top['constant_share']:.0f}% of it constant across tokens (|Q^T mean| = "
        f"{top['constant_norm']:.0f} against a token-varying RMS of {top['varying_rms']:.0f}); "
        "where the constant part dominates, zero ablation mostly measures the removal of a "
        "constant vector (and the norm's rescaling), not of token information."
    )
    return [
        Text(text),
        Table(
            table,
            (
                f"Shares of the lens vectors' squared norm, {ctx.run}: per layer and subspace (basis unembed, "
                f"before the final norm, k = {int(top['k'])}), the constant part (the held-out mean's "
                "component) and the token-varying part, in percent of E||z||²; they add up exactly. "
                f"Every basis, site and k: results/{ctx.run}/h0/shares.tsv."
            ),
            digits=1,
        ),
    ]


H0 = AblationExperiment(
    "h0",
    "H0: SVD subspaces ablated in lens space",
    where="in lens space, z = T_i(h_i), the tuned lens's output in front of the unembedding",
    measure="KL(p_lens(z) ‖ p_lens(z ablated))",
    summary=h0_summary,
)


def h1_summary(ctx: RunContext, ablation: pd.DataFrame) -> list:
    """The lens pull-back's KL beside the size of the residual edit it needs."""
    pulled = ablation[ablation["basis"].isin(["lens_pullback", "random_lens_pullback"])]
    if pulled.empty or "edit_rel" not in pulled:
        return []
    mode = "zero" if "zero" in set(pulled["mode"]) else pulled["mode"].iloc[0]
    k = int(pulled["k"].max())
    cell = pulled[(pulled["mode"] == mode) & (pulled["k"] == k)]
    wide = cell.pivot(index="layer", columns="subspace", values=["kl", "edit_rel"])
    table = pd.DataFrame({"layer": wide.index})
    for subspace in ("output", "internal", "random"):
        if ("kl", subspace) in wide:
            table[f"KL {subspace}"] = wide[("kl", subspace)].to_numpy()
            table[f"edit {subspace}"] = wide[("edit_rel", subspace)].to_numpy()
    return [
        Table(
            table,
            (
                f"Lens-space ablation carried into the residual stream, {ctx.run} ({mode} mode, k = {k}): "
                "KL(p_model ‖ p_ablated) of the final output beside the edit's relative size "
                "||h' − h|| / ||h|| (mean over tokens). The edit satisfies T_i(h') = ablate(T_i(h)) exactly; "
                "where I + A_i is ill-conditioned it can be much larger than h itself, and the KL then "
                "measures a large residual edit as much as the lens-space removal. Random: the same "
                "operation on random lens-space subspaces (mean of the draws)."
            ),
        )
    ]


H1 = AblationExperiment(
    "h1",
    "H1: SVD subspaces ablated in the residual stream",
    where="in the model's own residual stream h_i, after which the remaining blocks run",
    measure="KL(p_model ‖ p_model ablated) of the final output",
    seed_site="residual",
    summary=h1_summary,
    extra_figures=(
        (
            "h1_heads",
            "Circuit ends: each attention head's induction score against the "
            "lens-space share of its write in the output subspace: the write w of block i is "
            "carried by the translator of the residual it lands in, M = I + A_{i+1} (M = I after "
            "the last block), and the share is Σ‖Qᵀ M w‖² / Σ‖M w‖² over held-out tokens.",
        ),
    ),
    extra_tables=(
        (
            "heads_test.tsv",
            "Circuit ends, permutation test within layers: do induction heads write a "
            "larger lens-space share into the output subspace than the other heads of their own layer? "
            "Effect (statistic): mean over induction heads of (share − mean share of the other heads of "
            "their layer), with a 95% bootstrap interval (effect_lo, effect_hi); p-value from permuting "
            "the induction flags among the heads of each layer, over the n_layers layers that hold both "
            "kinds.",
            False,
        ),
        (
            "mlp.tsv",
            "MLPs: the lens-space share of each block's MLP write in the output and internal "
            "subspaces; write_norm and lens_write_norm give its RMS size before and after the "
            "translator.",
            True,
        ),
        (
            "heads.tsv",
            "Attention heads: induction score and the lens-space share of each head's write "
            "in the output and internal subspaces (with the write's RMS size before and after the "
            "translator).",
            True,
        ),
    ),
)


def h2_summary(ctx: RunContext, ablation: pd.DataFrame) -> list:
    fit_path = ctx.path("h2", "fit.tsv")
    if not fit_path.exists():
        return []
    fit = pd.read_csv(fit_path, sep="\t")
    table, k = tables.embedding_lens_table(fit, ablation)
    blocks = []
    if "embed_tied_to_unembed" in fit and bool(fit["embed_tied_to_unembed"].astype(bool).all()):
        blocks.append(
            Text(
                f"Model '{ctx.spec['model']}' ties its token embedding to its unembedding (W_E = W_U; "
                "embed_tied_to_unembed in h2/fit.tsv). H2's embedding basis, the right singular vectors of "
                "W_E, is therefore exactly H0's unembed basis: the input (top-k) and bottom-k ablations "
                "remove H0's output and internal directions, applied at E_i's input rather than at the "
                "lens output. They are a second view of the same basis, not evidence from an independent one."
            )
        )
    return blocks + [
        Table(
            table,
            (
                f"Embedding lenses E_i, {ctx.run}: R² = held-out share of h_i's variance that E_i explains; "
                "route KLs = held-out KL(p_model ‖ p via E_i) in nats, through the tuned lens T_i (lens route) "
                "or by running the rest of the model from E_i(e), with the model's own layer-i residual at "
                f"position 0 (the attention sink, which E_i cannot stand in for) (downstream route); ablation KLs at k = {k}: "
                "KL(p via E_i ‖ p via E_i with k directions of W_E's SVD ablated at E_i's input) "
                f"(input = top-k, bottom = bottom-k, random = seeded control); {_tokens(fit)} held-out tokens."
            ),
            ctx.table("h2") if ctx.table("h2").exists() else None,
        )
    ]


H2 = AblationExperiment(
    "h2",
    "H2: token-embedding directions ablated at the embedding lens's input",
    where="at the input of the embedding lens E_i (token embedding -> layer i), read through T_i",
    measure="KL(p via E_i ‖ p via E_i ablated)",
    seed_site=None,
    summary=h2_summary,
    subspace_words=(
        ("output", "input (top-k right singular vectors of W_E)"),
        ("internal", "bottom-k right singular vectors of W_E"),
    ),
)


def shuffle_section(ctx: RunContext) -> Section | None:
    path = ctx.path("shuffle", "swaps.tsv")
    if not path.exists():
        return None
    table = pd.read_csv(path, sep="\t")
    kinds = table["kind"] if "kind" in table else pd.Series("swap", index=table.index)
    swaps, windows = table[kinds == "swap"], table[kinds != "swap"]
    section = Section("shuffle", "Layer shuffle")
    caption = (
        f"Layer shuffle, {ctx.run}: blocks i and j swapped; KL(p_model ‖ p_swapped) of the "
        f"final output, nats, mean over {_tokens(swaps)} held-out tokens; {_interval(ctx)}."
    )
    if ctx.figure("shuffle").exists():
        section.blocks.append(Figure(ctx.figure("shuffle"), caption))
    for space, part in swaps.groupby("space", sort=False):
        matrix = part.pivot_table(
            index="i", columns="j", values="kl", aggfunc="first"
        ).reset_index()
        matrix.columns = ["i \\ j", *(str(c) for c in matrix.columns[1:])]
        section.blocks.append(
            Table(matrix, f"Swap cost (KL, nats) in the {space} space; " + caption)
        )
    if not windows.empty:
        section.blocks.append(
            Table(
                windows.reset_index(drop=True),
                (
                    "Permutations within windows of neighbouring blocks: KL(p_model ‖ p_permuted) in nats with "
                    f"95% intervals and top-1 agreement, {_tokens(windows)} held-out tokens."
                ),
                collapsed=True,
            )
        )
    conditions = ctx.path("shuffle", "conditions.tsv")
    if conditions.exists():
        section.blocks.append(
            Table(
                pd.read_csv(conditions, sep="\t"),
                (
                    "Condition numbers of the translators I + A_i (how far lens space distorts each layer)."
                ),
                collapsed=True,
            )
        )
    return section


def ood_section(ctx: RunContext) -> Section | None:
    """Out of distribution: where the lens and the H0 verdict survive the shift to other corpora."""
    corpora = [
        c for c in ctx.spec.get("eval_corpora", []) if ctx.path("ood", c, "ablation.tsv").exists()
    ]
    if not corpora:
        return None
    home = ctx.path("lens_eval.tsv")
    home_lens = pd.read_csv(home, sep="\t") if home.exists() else None
    lines = []
    for corpus in corpora:
        lens = pd.read_csv(ctx.path("ood", corpus, "lens_eval.tsv"), sep="\t")
        ablation = pd.read_csv(ctx.path("ood", corpus, "ablation.tsv"), sep="\t")
        wide = lens.pivot(index="layer", columns="lens", values="kl")
        better = int((wide["tuned"] < wide["logit"]).sum())
        shift = ""
        if home_lens is not None:
            mine = home_lens.pivot(index="layer", columns="lens", values="kl")["tuned"]
            ratio = (wide["tuned"] / mine).median()
            shift = f"; its KL is {ratio:.1f}× the in-distribution KL (median over layers)"
        cells = ablation[(ablation["subspace"] == "output") & (ablation["basis"] == "unembed")]
        verdicts = []
        for mode, part in cells.groupby("mode", sort=False):
            above = part[part["verdict"] == "holds"]["layer"]
            below = part[part["verdict"] == "reversed"]["layer"]
            verdicts.append(
                f"{mode} mode: output > internal at {len(above)} of {len(part)} layers, internal > output "
                f"at {len(below)}"
            )
        lines.append(
            f"{corpus} ({_tokens(lens)} held-out tokens): the tuned lens beats the logit lens at {better} of "
            f"{len(wide)} layers{shift}. H0 (unembed, k = d/2, pre_norm): "
            + "; ".join(verdicts)
            + "."
        )
    lines.append(
        "Verdicts: paired bootstrap-t test of KL(ablate output) − KL(ablate internal) over the eval "
        "corpus's sequences, Holm-corrected over the corpus's layers and modes (family-wise 0.05); the mean "
        "mode keeps the in-distribution training means. Eval corpora are "
        "tokenized with the run's tokenizer and refused if they share a token n-gram with its training tokens."
    )
    blocks: list = [Text(" ".join(lines))]
    if ctx.figure("ood").exists():
        blocks.append(
            Figure(
                ctx.figure("ood"),
                (
                    f"Out of distribution, {ctx.run}: left, held-out lens KL by layer for the run's own corpus and "
                    f"{', '.join(corpora)} (tuned solid, band: {_interval(ctx)}; logit dotted); right, KL(ablate output) − "
                    "KL(ablate internal), zero mode, unembed basis, k = d/2, pre_norm, with paired 95% intervals."
                ),
            )
        )
    frames = {}
    if home_lens is not None and ctx.path("h0", "ablation.tsv").exists():
        frames[f"{ctx.spec['corpus']} (in distribution)"] = (
            home_lens,
            pd.read_csv(ctx.path("h0", "ablation.tsv"), sep="\t"),
        )
    for corpus in corpora:
        frames[corpus] = (
            pd.read_csv(ctx.path("ood", corpus, "lens_eval.tsv"), sep="\t"),
            pd.read_csv(ctx.path("ood", corpus, "ablation.tsv"), sep="\t"),
        )
    blocks.append(
        Table(
            tables.ood_table(frames),
            (
                "Per corpus, layer and mode: tuned and logit lens KL and the seed-layout H0 cells (random: mean of its "
                "draws); output − internal with its paired 95% interval where computed (the eval corpora)."
            ),
            markdown_path=ctx.table("ood"),
            collapsed=True,
        )
    )
    return Section("ood", "Out of distribution", blocks)


def lens_budget_section(ctx: RunContext) -> Section | None:
    """Lens quality against the H0 verdict: the budget sweep's table, figure and what it says."""
    path = ctx.path("lens_quality", "sweep.tsv")
    if not path.exists():
        return None
    sweep = pd.read_csv(path, sep="\t")
    budgets = list(dict.fromkeys(sweep["budget"]))
    by_budget = sweep.groupby("budget", sort=False)["lens_kl"].mean()
    fits = sweep.drop_duplicates("budget")
    lines = [
        f"The run's lens retrained at {len(budgets)} budgets ({', '.join(budgets)}: least squares on the first "
        "training tokens, "
        + ", ".join(f"{r.budget} {int(r.lstsq_tokens):,}" for r in fits.itertuples())
        + "; lstsq+kl holds out the last of its training sequences to decide, per layer, whether the run's "
        f"KL refinement is kept) at {_layers(sweep['layer'])}; held-out lens KL averaged over "
        f"these layers: " + ", ".join(f"{b} {number(v)}" for b, v in by_budget.items()) + " nats."
    ]
    for mode, part in sweep.groupby("mode", sort=False):
        counts = part["verdict"].value_counts()
        best = part.loc[part.groupby("layer")["lens_kl"].idxmin()]
        worst = part.loc[part.groupby("layer")["lens_kl"].idxmax()]
        holds = lambda frame: int((frame["verdict"] == "output > internal").sum())  # noqa: E731
        corr = part["lens_kl"].rank().corr(part["diff"].rank())
        lines.append(
            f"Mode {mode}: output > internal at {counts.get('output > internal', 0)} of {len(part)} (budget, layer) "
            f"points, internal > output at {counts.get('internal > output', 0)}, not separable at "
            f"{counts.get('not separable', 0)}; with each layer's best lens it holds at {holds(best)} of {len(best)} "
            f"layers, with its worst at {holds(worst)}; rank correlation of lens KL with output − internal "
            f"{corr:.2f}."
        )
    lines.append(
        "Each verdict: paired bootstrap-t test of KL(ablate output) − KL(ablate internal) over the "
        f"sequences of {_tokens(sweep)} held-out tokens, Holm-corrected over the sweep's {len(sweep)} "
        "points (family-wise 0.05); the intervals are the uncorrected 95% ones."
    )
    blocks: list = [Text(" ".join(lines))]
    if ctx.figure("lens_quality").exists():
        blocks.append(
            Figure(
                ctx.figure("lens_quality"),
                (
                    f"H0 verdict against lens quality, {ctx.run}: output − internal KL (unembed basis, k = "
                    f"{int(sweep['k'].iloc[0])}, pre_norm) with its 95% paired interval against the lens's held-out KL, "
                    f"one point per budget and layer ({len(budgets)} budgets, {sweep['layer'].nunique()} layers); "
                    f"panels: {', '.join(dict.fromkeys(sweep['mode']))} mode."
                ),
            )
        )
    blocks.append(
        Table(
            tables.lens_budget_table(sweep),
            (
                "Per budget, layer and mode: held-out lens KL, the ablation KLs (random: mean of "
                f"{int(sweep['n_draws'].iloc[0])} draws) and output − internal; [ ]: {_interval(ctx)}."
            ),
            markdown_path=ctx.table("lens_quality"),
            collapsed=True,
        )
    )
    return Section("lens-budget", "Lens quality against the H0 verdict", blocks)


def _read_tsv(path: Path) -> pd.DataFrame:
    """A TSV that may hold a header only (or nothing at all, when a stage had no rows)."""
    try:
        return pd.read_csv(path, sep="\t")
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _separated(frame: pd.DataFrame, name: str) -> tuple[int, int]:
    """How many rows hold / are reversed on metric ``name`` (Holm-adjusted, beyond the matched draws)."""
    return int((frame[f"verdict_{name}"] == "holds").sum()), int(
        (frame[f"verdict_{name}"] == "reversed").sum()
    )


def neurons_section(ctx: RunContext) -> Section | None:
    """Single MLP neurons: geometry, entropy-neuron candidates, their causal test, the published list."""
    path = ctx.path("neurons", "neurons.tsv")
    if not path.exists():
        return None
    neurons = pd.read_csv(path, sep="\t")
    candidates = _read_tsv(ctx.path("neurons", "candidates.tsv"))
    joint = _read_tsv(ctx.path("neurons", "joint.tsv"))
    settings = ctx.config.get("neurons", {})
    threshold = settings.get("min_internal_share", 0.9)
    k = int(neurons["k"].iloc[0])
    n_layers = neurons["layer"].nunique()
    pool = neurons[neurons["in_candidate_layers"].astype(bool)]
    passing = pool[pool["internal_fraction"] >= threshold]
    blocks: list = []
    lines = [
        f"{len(neurons):,} MLP neurons ({n_layers} blocks × {len(neurons) // n_layers:,}); the lens-space "
        f"share of each neuron's output weight w is ||Qᵀ M w||² / ||M w||² in the unembed basis, k = {k} "
        f"(M = I + A_(l+1) of the residual block l writes into; I after the last block). Median internal "
        f"share {neurons['internal_fraction'].median():.3f}; {len(passing):,} of the {len(pool):,} neurons of "
        f"{_layers(pool['layer'])} reach {threshold:g} or more."
    ]
    if candidates.empty:
        lines.append("No neuron passes the threshold: there are no candidates to ablate.")
    else:
        n = len(candidates)
        lines.append(
            f"Candidates: the {n} largest-norm of them ({_layers(candidates['layer'])}; norms "
            f"{candidates['norm'].min():.2f}–{candidates['norm'].max():.2f} against a median of "
            f"{neurons['norm'].median():.2f})."
        )
        if "null_fraction" in neurons:
            ranks = pool.assign(
                rel=pool.groupby("layer")["logit_effect_rel"].rank(pct=True),
                null=pool.groupby("layer")["null_fraction"].rank(pct=True),
            )
            chosen = ranks.set_index(["layer", "neuron"]).loc[
                list(zip(candidates["layer"], candidates["neuron"]))
            ]
            lines.append(
                f"In the geometry of Stolfo et al. (the centred, gain-folded unembedding's bottom "
                f"{int(neurons['null_k'].iloc[0])} directions as its "
                f"effective null space) the candidates' null-space share has median "
                f"{candidates['null_fraction'].median():.3f} against {pool['null_fraction'].median():.3f} for their "
                f"layers' neurons (median percentile in their layer {chosen['null'].median():.0%}), and their logit "
                f"effect per unit of lens norm sits at median percentile {chosen['rel'].median():.0%} (low: the "
                "unembedding barely reads them)."
            )
        if "verdict_abs_d_entropy" in candidates:
            up_h, down_h = _separated(candidates, "abs_d_entropy")
            up_k, _ = _separated(candidates, "kl")
            up_t, down_t = _separated(candidates, "top1_change")
            n_tokens = int(candidates["n_tokens"].iloc[0])
            lines.append(
                f"Each candidate mean-ablated alone ({n_tokens:,} held-out tokens, against "
                f"{int(candidates['n_draws'].iloc[0])} random neurons of its layer and matched norm, their norms "
                f"{candidates['matched_norm_ratio'].min():.2f}–{candidates['matched_norm_ratio'].max():.2f}× the "
                f"candidate's): the output's entropy changes more than for the matched neurons at {up_h} of {n} "
                f"candidates (less at {down_h}), the KL is larger at {up_k}, the top-1 token changes more often at "
                f"{up_t} (less at {down_t}). Each verdict: a matched permutation test over sequences, Holm-corrected "
                f"over the experiment's {3 * (n + len(joint))} comparisons (family-wise 0.05), and the candidate beyond "
                f"every matched draw. Mean |ΔH| / KL: candidates {candidates['entropy_per_kl'].mean():.2f}, matched "
                f"random {candidates['random_entropy_per_kl'].mean():.2f}."
            )
            entropy_like = candidates[candidates["entropy_account"].astype(bool)]
            lines.append(
                f"The entropy-neuron account (|ΔH| above the matched neurons', the top-1 token changed at most "
                f"{settings.get('top1_margin', 0.01):g} of positions more often than theirs (upper end of the paired "
                f"95% interval), and |ΔH| / KL with its 95% interval above every matched draw's) fits "
                f"{len(entropy_like)} of {n}: "
                + (
                    ", ".join(f"{int(r.layer)}.{int(r.neuron)}" for r in entropy_like.itertuples())
                    or "none"
                )
                + "."
            )
        if not joint.empty:
            row = joint.iloc[0]
            lines.append(
                f"All {int(row['n_neurons'])} together: |ΔH| {row['abs_d_entropy']:.4f} "
                f"[{row['abs_d_entropy_lo']:.4f}, {row['abs_d_entropy_hi']:.4f}] vs random sets "
                f"{row['random_abs_d_entropy']:.4f}; KL {number(row['kl'])} vs {number(row['random_kl'])}; "
                f"top-1 changed {row['top1_change']:.4f} vs {row['random_top1_change']:.4f}."
            )
    reference_path = ctx.path("neurons", "reference.tsv")
    reference = _read_tsv(reference_path) if reference_path.exists() else pd.DataFrame()
    if not reference.empty:
        hits = reference[reference["is_candidate"].astype(bool)]
        named = "; ".join(
            f"{int(r.layer)}.{int(r.neuron)}: {'a candidate' if r.is_candidate else 'not a candidate'} "
            f"(internal share {r.internal_fraction:.3f}, norm rank {int(r.norm_rank_in_layer)} in its "
            f"layer)"
            for r in reference.itertuples()
        )
        lines.append(
            f"Published entropy neurons ({reference['reference'].iloc[0]}): ours include "
            f"{len(hits)} of {len(reference)}. {named}."
        )
    blocks.append(Text(" ".join(lines)))
    if ctx.figure("neurons").exists():
        blocks.append(
            Figure(
                ctx.figure("neurons"),
                (
                    f"MLP neurons of {ctx.run}: output weight norm ||w|| (log scale) against the internal share of the "
                    f"lens-space write, k = {k}; colour: block; circles: the {len(candidates)} candidates (share ≥ "
                    f"{threshold:g}, largest norms)"
                    + ("; crosses: the published entropy neurons." if not reference.empty else ".")
                ),
            )
        )
    if not candidates.empty:
        blocks.append(
            Table(
                tables.neuron_candidates_table(candidates),
                (
                    "Candidates, each mean-ablated alone: abs ΔH = mean absolute change of the output's entropy (nats), "
                    "KL(model ‖ ablated), share of positions whose top-1 token changes; 'random': random neurons of "
                    "the same layer and matched norm (mean over draws); 'diff': paired difference; "
                    f"[ ]: {_interval(ctx)} (BCa for the top-1 share, whose per-sequence values are discrete)."
                ),
                markdown_path=ctx.table("neurons"),
            )
        )
    return Section("neurons", "Single neurons (entropy-neuron candidates)", blocks)


def _verdict_counts(verdicts: pd.DataFrame, conclusion: str) -> str:
    part = verdicts[verdicts["conclusion"] == conclusion]
    counts = part["verdict"].value_counts()
    return (
        f"holds in {counts.get(robustness.HOLDS, 0)}, reversed in {counts.get(robustness.REVERSED, 0)}, "
        f"not separable in {counts.get(robustness.NOT_SEPARABLE, 0)} of {len(part)} cells"
    )


def _seed_cell(verdicts: pd.DataFrame, site: str) -> str:
    """The verdict of "output > internal" in the seed's own cell (unembed, zero), by layer."""
    cell = verdicts[
        (verdicts["conclusion"] == "output > internal")
        & (verdicts["basis"] == "unembed")
        & (verdicts["mode"] == "zero")
        & (verdicts["site"] == site)
    ]
    cell = cell[cell["k"] == cell["k"].max()] if not cell.empty else cell
    if cell.empty:
        return ""
    by_verdict = {
        v: sorted(int(x) for x in cell.loc[cell["verdict"] == v, "layer"])
        for v in robustness.VERDICTS
    }
    parts = [f"{v} at {_layers(layers)}" for v, layers in by_verdict.items() if layers]
    return (
        f" In the seed's own cell (basis unembed, zero ablation, {site}): " + "; ".join(parts) + "."
    )


def findings_section(ctx: RunContext) -> Section | None:
    """The run's conclusions in a few sentences, each with its procedure, read from the results."""
    lines = []
    for experiment, site in ((H0, "pre_norm"), (H1, "residual"), (H2, "embedding")):
        path = ctx.path(experiment.key, "comparisons.tsv")
        if not path.exists():
            continue
        verdicts = pd.read_csv(path, sep="\t")
        if verdicts.empty:
            continue
        said = "; ".join(
            f'"{c}" {_verdict_counts(verdicts, c)}' for c in dict.fromkeys(verdicts["conclusion"])
        )
        lines.append(
            f"{experiment.title}: {said}.{_seed_cell(verdicts, site)} Each verdict: "
            f"{robustness.PROCEDURE} (family: the {len(verdicts)} comparisons of this experiment)."
        )
    test_path = ctx.path("h1", "heads_test.tsv")
    if test_path.exists():
        test = pd.read_csv(test_path, sep="\t").iloc[0]
        if pd.notna(test.get("statistic")):
            interval = (
                f" (95% interval {number(test['effect_lo'])} to {number(test['effect_hi'])})"
                if "effect_lo" in test and pd.notna(test["effect_lo"])
                else ""
            )
            lines.append(
                f"Circuit ends: induction heads' lens-space output share minus that of other heads "
                f"of the same layer {number(test['statistic'])}{interval}, permutation p = "
                f"{number(test['p_value'])} over {int(test['n_compared'])} induction heads."
            )
    fit_path = ctx.path("h2", "fit.tsv")
    if fit_path.exists():
        fit = pd.read_csv(fit_path, sep="\t")
        if "embed_tied_to_unembed" in fit and bool(fit["embed_tied_to_unembed"].astype(bool).all()):
            lines.append(
                "H2: this model ties W_E to W_U, so the embedding basis of H2 is H0's unembedding "
                'basis: its "circuit beginnings" are not measured in an independent basis.'
            )
    statement = shuffle_statement(ctx)
    if statement:
        lines.append(statement)
    if not lines:
        return None
    return Section(
        "findings",
        "Findings",
        [Text("<ul>" + "".join(f"<li>{_esc(line)}</li>" for line in lines) + "</ul>", html=True)],
    )


def shuffle_statement(ctx: RunContext) -> str | None:
    """The plain statement of when lens-space swaps measure the translators (shuffle.py decides)."""
    from lensspace.experiments.shuffle import translator_dominated

    path = ctx.path("shuffle", "swaps.tsv")
    return translator_dominated(pd.read_csv(path, sep="\t")) if path.exists() else None


SECTIONS: list[Callable[[RunContext], Section | None]] = [
    findings_section,
    lens_section,
    H0,
    H1,
    H2,
    shuffle_section,
    ood_section,
    lens_budget_section,
    neurons_section,
]


# ---------------------------------------------------------------- HTML
STYLE = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
 color:#1b1b1b;line-height:1.45;font-size:15px}
h1{font-size:1.7em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.6em}nav{background:#f4f6f8;padding:.6em 1em;border-radius:4px}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;display:block;border:1px solid #ddd}
figcaption,.caption{font-size:.88em;color:#333;margin-top:.4em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f0f0f0}
td.text,th.text{text-align:left}.scroll{overflow-x:auto}
table.grid{font-size:.78em}table.grid th.l,table.grid th.group{text-align:center;padding:.1em .2em}
.v{text-align:center;font-weight:bold;padding:.1em .25em;min-width:1.2em}
.holds{background:#c8e6c9;color:#1b5e20}.reversed{background:#ffcdd2;color:#b71c1c}
.notsep{background:#eeeeee;color:#616161}.group{border-left:2px solid #555}
.legend span{display:inline-block;padding:.1em .5em;margin-right:.5em;font-size:.85em}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.82em}
details{margin:.6em 0}summary{cursor:pointer;color:#1f5f99}details.md summary{font-size:.8em}
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _cell(value, digits: int | None = None) -> str:
    if isinstance(value, float):
        return number(value) if digits is None or pd.isna(value) else f"{value:.{digits}f}"
    return _esc(value)


def html_table(frame: pd.DataFrame, digits: int | None = None) -> str:
    text = [not pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    align = [' class="text"' if t else "" for t in text]
    head = "".join(f"<th{a}>{_esc(c)}</th>" for c, a in zip(frame.columns, align))
    rows = []
    for row in frame.itertuples(index=False):
        cells = "".join(f"<td{a}>{_cell(v, digits)}</td>" for v, a in zip(row, align))
        rows.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def html_grid(verdicts: pd.DataFrame) -> str:
    """One row per variant (basis, mode, site, k); per conclusion a block of one cell per layer."""
    wide = robustness.grid(verdicts)
    layers = [c for c in wide.columns if c not in ("conclusion", *robustness.VARIANT)]
    conclusions = list(dict.fromkeys(wide["conclusion"]))
    css = {
        robustness.HOLDS: "holds",
        robustness.REVERSED: "reversed",
        robustness.NOT_SEPARABLE: "notsep",
    }
    top = "<th class='text' colspan='4'>variant (rows); layer (columns)</th>" + "".join(
        f"<th class='group' colspan='{len(layers)}'>{_esc(c)}</th>" for c in conclusions
    )
    second = (
        "<th class='text'>basis</th><th class='text'>mode</th><th class='text'>site</th><th>k</th>"
        + "".join(
            f"<th class='{'group' if n == 0 else 'l'}'>{layer}</th>"
            for _ in conclusions
            for n, layer in enumerate(layers)
        )
    )
    by_variant = {tuple(r[v] for v in robustness.VARIANT): {} for r in wide.to_dict("records")}
    for r in wide.to_dict("records"):
        by_variant[tuple(r[v] for v in robustness.VARIANT)][r["conclusion"]] = r
    rows = []
    for variant, per_conclusion in by_variant.items():
        cells = []
        for conclusion in conclusions:
            row = per_conclusion.get(conclusion, {})
            for n, layer in enumerate(layers):
                value = row.get(layer)
                edge = " group" if n == 0 else ""
                if isinstance(value, str):
                    cells.append(
                        f'<td class="v {css[value]}{edge}" title="{_esc(conclusion)}, layer {layer}: '
                        f'{_esc(value)}">{robustness.SYMBOL[value]}</td>'
                    )
                else:
                    cells.append(f'<td class="v{edge}"></td>')
        labels = (
            "".join(f"<td class='text'>{_esc(v)}</td>" for v in variant[:3])
            + f"<td>{_esc(variant[3])}</td>"
        )
        rows.append(f"<tr>{labels}{''.join(cells)}</tr>")
    counts = robustness.summary(verdicts)
    summary = "".join(
        f"<li><b>{_esc(r['conclusion'])}</b>: holds in {r[robustness.HOLDS]} of {r['cells']} cells, "
        f"reversed in {r[robustness.REVERSED]}, not separable in {r[robustness.NOT_SEPARABLE]}</li>"
        for r in counts.to_dict("records")
    )
    legend = (
        f"<span class='v holds'>{robustness.SYMBOL[robustness.HOLDS]} holds</span> "
        f"<span class='v reversed'>{robustness.SYMBOL[robustness.REVERSED]} reversed</span> "
        f"<span class='v notsep'>{robustness.SYMBOL[robustness.NOT_SEPARABLE]} not separable</span>"
    )
    return (
        f"<ul>{summary}</ul><p class='legend'>{legend}</p><div class='scroll'><table class='grid'>"
        f"<thead><tr>{top}</tr><tr>{second}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _png_width(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return struct.unpack(">I", data[16:20])[0]
    return None


def html_figure(figure: Figure) -> str:
    data = figure.path.read_bytes()
    width = _png_width(data)
    # Figures are saved at 200 dpi: show them at about half their pixel width (print size).
    style = f' style="width:{width // 2}px"' if width else ""
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return (
        f'<figure><img src="{uri}" alt="{_esc(figure.path.name)}"{style}>'
        f"<figcaption>{_esc(figure.caption)}</figcaption></figure>"
    )


def _markdown(text: str) -> str:
    return f"<details class='md'><summary>Markdown</summary><pre>{_esc(text)}</pre></details>"


def html_block(block) -> str:
    if isinstance(block, Figure):
        return html_figure(block)
    if isinstance(block, Table):
        source = (
            f" Markdown: <code>{_esc(block.markdown_path)}</code>." if block.markdown_path else ""
        )
        caption = f"<p class='caption'>{_esc(block.caption)}{source}</p>"
        if block.with_markdown:
            caption += _markdown(tables.markdown(block.frame))
        table = html_table(block.frame, block.digits)
        if block.collapsed:
            return (
                f"<details><summary>{_esc(block.caption.split(':')[0])} ({len(block.frame)} rows)"
                f"</summary>{table}</details>{caption}"
            )
        return f"{table}{caption}"
    if isinstance(block, Grid):
        return (
            f"<div data-block='robustness'>{html_grid(block.verdicts)}<p class='caption'>{_esc(block.caption)}"
            f"</p>{_markdown(robustness.markdown_grid(block.verdicts))}</div>"
        )
    if isinstance(block, Text):
        return block.text if block.html else f"<p>{_esc(block.text)}</p>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def _anchor(run: str, key: str) -> str:
    return f"{run}--{key}".replace(" ", "-")


def provenance_section(config: dict, results: Path, workflow_dir: Path) -> Section:
    names = set(config["runs"]) | {spec["model"] for spec in config["runs"].values()}
    jobs = provenance.benchmark_jobs(results, names)
    rules = provenance.per_rule(jobs).rename(
        columns={"total_s": "total s", "max_s": "max s", "peak_rss_mb": "peak RSS MB"}
    )
    git = provenance.git_state(workflow_dir)
    facts = pd.DataFrame(
        [
            ("config sha256", provenance.config_hash(config)),
            ("git commit", git["commit"]),
            ("uncommitted changes", git["dirty"]),
            *provenance.machine().items(),
            *provenance.compute_records(results, config["runs"]).items(),
        ],
        columns=["what", "value"],
    )
    versions = pd.DataFrame(
        sorted(provenance.package_versions().items()), columns=["package", "version"]
    )
    total = (
        f"{len(jobs)} benchmarked jobs, {jobs['s'].sum():.1f} s in all; the largest peak RSS "
        f"{jobs['max_rss_mb'].max():.0f} MB."
        if not jobs.empty
        else "No benchmark files found."
    )
    return Section(
        "provenance",
        "Provenance",
        [
            Table(
                facts,
                "The config's hash is the sha256 of the config as canonical JSON.",
                with_markdown=False,
            ),
            Text(
                f"<details><summary>Config</summary><pre>{_esc(yaml.safe_dump(config, sort_keys=False))}"
                "</pre></details>",
                html=True,
            ),
            Table(
                rules,
                "Per-rule time and memory from the rules' benchmark: files "
                f"(results/benchmarks/): wall seconds summed over jobs, the longest job, and the "
                f"peak resident memory of any job. {total}",
                digits=1,
            ),
            Table(
                versions,
                "Installed package versions (the project's pinned dependencies).",
                with_markdown=False,
            ),
        ],
    )


def build(
    config: dict,
    results: str | Path,
    reference: str | Path,
    resources: str | Path = "resources",
    workflow_dir: str | Path = ".",
) -> str:
    """The whole page as one HTML string."""
    results, resources = Path(results), Path(resources)
    body, toc = [], []
    for run in config["runs"]:
        ctx = RunContext(run, config, results, resources, Path(reference))
        sections = [s for s in (builder(ctx) for builder in SECTIONS) if s is not None]
        toc.append(
            f"<li><a href='#{_esc(run)}'>{_esc(run)}</a>: "
            + ", ".join(f"<a href='#{_anchor(run, s.key)}'>{_esc(s.title)}</a>" for s in sections)
            + "</li>"
        )
        spec = ctx.spec
        parts = [
            f"<section class='run' id='{_esc(run)}' data-run='{_esc(run)}'><h2>Run {_esc(run)}</h2>",
            f"<p>Model <b>{_esc(spec['model'])}</b>, corpus <b>{_esc(spec['corpus'])}</b>, lens "
            f"source <b>{_esc(spec['lens']['source'])}</b>.</p>",
        ]
        for section in sections:
            parts.append(
                f"<section id='{_anchor(run, section.key)}' data-section='{_esc(section.key)}'>"
                f"<h3>{_esc(section.title)}</h3>{''.join(html_block(b) for b in section.blocks)}</section>"
            )
        body.append("".join(parts) + "</section>")
    prov = provenance_section(config, results, Path(workflow_dir))
    toc.append("<li><a href='#provenance'>Provenance</a></li>")
    body.append(
        f"<section id='provenance' data-section='provenance'><h2>{prov.title}</h2>"
        f"{''.join(html_block(b) for b in prov.blocks)}</section>"
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>lensspace report</title><style>{STYLE}</style></head><body>"
        "<h1>lensspace: the lens-aligned predictive space of tuned lenses</h1>"
        f"<p>Runs: {', '.join(_esc(r) for r in config['runs'])}. All KL values are in nats, means "
        "over held-out token positions (position 0 excluded), with 95% bootstrap intervals over "
        "sequences. Every number and figure here is read from this run's results.</p>"
        f"<nav><b>Contents</b><ul>{''.join(toc)}</ul></nav>{''.join(body)}</body></html>"
    )
