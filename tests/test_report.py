"""The report: robustness classification and table builders on hand-made TSVs, the page
built from a hand-made results folder, and the tiny run's page loaded in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, snakemake
from PIL import Image, ImageStat

from lensspace import plots, provenance, robustness
from lensspace.report import build, words
from lensspace.report.ablation import compare
from lensspace.report.h0 import H0
from lensspace.report.lens import quality_table
from lensspace.report.render import html_grid
from lensspace.report.shuffle import extremes

ABLATION_COLUMNS = [
    "layer",
    "subspace",
    "k",
    "basis",
    "mode",
    "site",
    "kl",
    "kl_lo",
    "kl_hi",
    "n_tokens",
]


def ablation_tsv(tmp_path: Path, rows: list[tuple]) -> pd.DataFrame:
    """Rows (layer, subspace, k, basis, mode, site, kl, kl_lo, kl_hi) written and read as a TSV."""
    path = tmp_path / "ablation.tsv"
    pd.DataFrame([(*r, 100) for r in rows], columns=ABLATION_COLUMNS).to_csv(
        path, sep="\t", index=False
    )
    return pd.read_csv(path, sep="\t")


# ------------------------------------------------------------------ robustness
SEQ_COLUMNS = ["layer", "subspace", "k", "basis", "mode", "site", "draw", "sequence", "kl"]
BASE = [0.3, 2.5, 0.8, 4.0, 1.2, 0.5, 3.1, 0.9, 1.7, 0.6, 2.2, 1.0, 0.4, 5.0, 1.4, 0.7]  # skewed


def per_sequence(cells: dict) -> pd.DataFrame:
    """{(layer, subspace, basis): [draws x sequences] KLs} as a per-sequence table (k 4, zero,
    pre_norm)."""
    rows = [
        (layer, subspace, 4, basis, "zero", "pre_norm", draw, seq, kl)
        for (layer, subspace, basis), draws in cells.items()
        for draw, values in enumerate(draws)
        for seq, kl in enumerate(values)
    ]
    return pd.DataFrame(rows, columns=SEQ_COLUMNS)


@pytest.fixture
def hand_made():
    scaled = lambda f, shift=0.0: [b * f + shift for b in BASE]  # noqa: E731
    return per_sequence(
        {
            # layer 0, unembed: output 3x internal; random draws in between
            (0, "output", "unembed"): [scaled(3)],
            (0, "internal", "unembed"): [scaled(1)],
            # unembed_centered: reversed; internal inside the random draws' range
            (0, "output", "unembed_centered"): [scaled(0.5)],
            (0, "internal", "unembed_centered"): [scaled(1.6)],
            (0, "random", "random"): [scaled(1.5), scaled(1.6), scaled(1.7), scaled(1.8)],
            # layer 1: a small shift that is the same in every sequence: the marginal intervals
            # overlap (sequences vary 0.3-5.0), the paired difference does not
            (1, "output", "unembed"): [scaled(1, 0.05)],
            (1, "internal", "unembed"): [scaled(1)],
            (1, "output", "unembed_centered"): [scaled(1)],
            (1, "internal", "unembed_centered"): [scaled(1)],
            (1, "random", "random"): [
                scaled(1, 0.01),
                scaled(1, 0.02),
                scaled(1, 0.03),
                scaled(1, 0.04),
            ],
        }
    )


def test_compare_judges_every_conclusion_variant_and_layer_by_paired_tests(hand_made):
    verdicts = robustness.compare(hand_made, n_boot=4000)
    assert list(verdicts.columns) == robustness.COLUMNS
    assert len(verdicts) == 12  # 3 conclusions x 2 bases x 2 layers
    got = {(r.conclusion, r.basis, r.layer): r.verdict for r in verdicts.itertuples()}
    assert got[("output > internal", "unembed", 0)] == "holds"
    assert got[("output > internal", "unembed_centered", 0)] == "reversed"
    assert got[("output > random", "unembed", 0)] == "holds"
    assert got[("output > random", "unembed_centered", 0)] == "reversed"
    assert got[("random > internal", "unembed", 0)] == "holds"
    # significant against the draws' mean, but inside their range: not beyond the control's spread
    assert got[("random > internal", "unembed_centered", 0)] == "not separable"
    # the paired test sees the consistent shift the overlapping marginal intervals hide
    assert got[("output > internal", "unembed", 1)] == "holds"
    assert got[("output > internal", "unembed_centered", 1)] == "not separable"
    row = verdicts[
        (verdicts["conclusion"] == "output > internal")
        & (verdicts["layer"] == 1)
        & (verdicts["basis"] == "unembed")
    ].iloc[0]
    assert row["diff"] == pytest.approx(0.05) and row["diff_lo"] == pytest.approx(0.05)
    # Holm over the whole family: adjusted p-values never below the raw ones
    assert (verdicts["p_adjusted"] >= verdicts["p_value"] - 1e-12).all()
    control = verdicts[verdicts["conclusion"] == "output > random"].iloc[0]
    assert control["n_draws"] == 4 and control["draw_min"] < control["draw_max"]


def test_holm_correction_turns_a_lone_small_effect_into_not_separable():
    """One weak but consistent-looking effect is significant alone, not among 60 comparisons."""
    gen = torch.Generator().manual_seed(0)
    cells = {}
    for layer in range(30):
        noise = (torch.randn(16, generator=gen) * 0.5).tolist()
        cells[(layer, "output", "unembed")] = [
            [b + n + (0.35 if layer == 0 else 0.0) for b, n in zip(BASE, noise)]
        ]
        cells[(layer, "internal", "unembed")] = [BASE]
    verdicts = robustness.compare(per_sequence(cells), n_boot=4000)
    first = verdicts[verdicts["layer"] == 0].iloc[0]
    assert (
        first["p_value"] < 0.05
        and first["p_adjusted"] > 0.05
        and first["verdict"] == "not separable"
    )
    alone = robustness.compare(
        per_sequence({k: v for k, v in cells.items() if k[0] == 0}), n_boot=4000
    )
    assert alone.iloc[0]["verdict"] == "holds"


def test_summary_grid_and_markdown(hand_made):
    verdicts = robustness.compare(hand_made, n_boot=2000)
    counts = robustness.summary(verdicts).set_index("conclusion")
    assert counts.loc["output > internal"].to_dict() == {
        "holds": 2,
        "reversed": 1,
        "not separable": 1,
        "cells": 4,
    }
    wide = robustness.grid(verdicts)
    assert list(wide.columns) == ["conclusion", "basis", "mode", "site", "k", 0, 1]
    assert len(wide) == 6 and list(dict.fromkeys(wide["conclusion"])) == [
        c.label for c in robustness.CONCLUSIONS
    ]
    lines = robustness.markdown_grid(verdicts).splitlines()
    assert lines[0] == "| conclusion | basis | mode | site | k | L0 | L1 |"
    assert "| output > internal | unembed | zero | pre_norm | 4 | ✓ | ✓ |" in lines
    assert "| output > internal | unembed_centered | zero | pre_norm | 4 | ✗ | · |" in lines
    assert "- output > internal: holds in 2 of 4 cells, reversed in 1, not separable in 1" in lines
    assert any(
        "Holm" in line and "the 12 comparisons" in line and "4 independent draws" in line
        for line in lines
    )


def test_html_grid_has_one_row_per_variant(hand_made):
    page = html_grid(robustness.compare(hand_made, n_boot=2000))
    assert page.count("<tr>") == 2 + 2  # two header rows, two variants (bases)
    assert (
        page.count('class="v reversed') == 3
    )  # centred basis at layer 0 (x2), below the draws at layer 1


def test_compare_without_control_or_with_missing_columns(hand_made):
    frame = hand_made[hand_made["subspace"] != "random"]
    assert set(robustness.compare(frame, n_boot=500)["conclusion"]) == {"output > internal"}
    with pytest.raises(Exception, match="missing: \\['draw'\\]"):
        robustness.compare(frame.drop(columns="draw"))


# ------------------------------------------------------------------ tables and provenance
def test_lens_quality_table():
    frame = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "lens": ["tuned", "logit"] * 2,
            "kl": [0.5, 2.0, 0.004, 1.0],
            "kl_lo": [0.4, 1.5, 0.003, 0.9],
            "kl_hi": [0.6, 2.5, 0.005, 1.1],
            "n_tokens": 10,
        }
    )
    table = quality_table(frame)
    assert list(table.columns) == ["layer", "tuned KL", "tuned 95% CI", "logit KL", "logit 95% CI"]
    assert table["tuned KL"].tolist() == [0.5, 0.004]
    assert table["tuned 95% CI"].tolist() == ["[0.400, 0.600]", "[0.003, 0.005]"]


# ------------------------------------------------------------------ findings' plain sentences
def seed_cells(kls: dict) -> pd.DataFrame:
    """H0 ablation rows of the seed's cell (unembed, zero, pre_norm, k 4), {layer: (output,
    internal)} KLs, with a mean-mode row of the opposite sign that the sentence must ignore."""
    rows = []
    for layer, (output, internal) in kls.items():
        for subspace, kl in (("output", output), ("internal", internal)):
            rows.append((layer, subspace, 4, "unembed", "zero", "pre_norm", kl, kl, kl, 100))
            other = internal if subspace == "output" else output
            rows.append((layer, subspace, 4, "unembed", "mean", "pre_norm", other, 0, 0, 100))
        rows.append((layer, "random", 4, "random", "zero", "pre_norm", 9.0, 9.0, 9.0, 100))
    return pd.DataFrame(rows, columns=ABLATION_COLUMNS)


def test_headline_says_which_subspace_costs_more_by_how_much_and_where():
    kls = {0: (3.2, 1.0), 15: (6.4, 2.0), 29: (9.6, 3.0)}
    said = H0.headline(seed_cells(kls))
    assert said.startswith(
        "Ablating the output subspace costs 3.2 times the KL of ablating the internal "
        "subspace at every one of layers 0, 15, 29 ("
    )
    assert "from 3.2 to 3.2 times" in said and "basis unembed, zero ablation, pre_norm" in said
    swapped = H0.headline(seed_cells({layer: (b, a) for layer, (a, b) in kls.items()}))
    assert swapped.startswith(
        "Ablating the internal subspace costs 3.2 times the KL of ablating the output "
        "subspace at every one of layers 0, 15, 29 ("
    )


def test_headline_of_a_split_verdict_counts_the_layers_each_way():
    kls = {0: (2.0, 1.0), 1: (1.0, 4.0), 2: (0.5, 3.0)}
    said = H0.headline(seed_cells(kls))
    assert said.startswith(
        "Ablating the internal subspace costs more KL than ablating the output subspace at 2 "
        "of 3 layers (layers 1–2), less at 1 (layer 0) ("
    )
    swapped = H0.headline(seed_cells({layer: (b, a) for layer, (a, b) in kls.items()}))
    assert swapped.startswith(
        "Ablating the output subspace costs more KL than ablating the internal subspace at 2 "
        "of 3 layers (layers 1–2), less at 1 (layer 0) ("
    )


def test_compare_with_a_zero_kl_and_ties():
    names = {"output": "output subspace", "internal": "internal subspace"}
    layers = pd.Index([0, 1], name="layer")
    said = compare(pd.Series([1.0, 2.0], layers), pd.Series([0.0, 1.0], layers), names)
    assert said == (
        "Ablating the output subspace costs more KL than ablating the internal subspace at every "
        "one of layers 0–1."
    )
    said = compare(pd.Series([1.0, 2.0], layers), pd.Series([1.0, 1.0], layers), names)
    assert said.endswith("at 1 of 2 layers (layer 1), the same at 1.")


def test_ratios_above_one_are_never_written_as_one():
    assert [words.ratio(v) for v in (3.21, 1.04, 1.0004, 0.96, 15.5, 1.0)] == [
        "3.2",
        "1.04",
        "1.0004",
        "0.96",
        "16",
        "1",
    ]


def test_shuffle_sentence_names_the_costliest_and_cheapest_swap():
    swaps = pd.DataFrame(
        {
            "i": [0, 0, 1, 0],
            "j": [1, 2, 2, 1],
            "space": ["native", "native", "native", "lens"],
            "kl": [0.5, 2.0, 0.25, 9.0],
        }
    )
    assert extremes(swaps) == (
        "Of the 3 swaps of two blocks in the native space, swapping blocks 0 and 2 costs most "
        "(KL 2.000 nats), swapping 1 and 2 least (0.250 nats)."
    )


# ------------------------------------------------------------------ the ablation figure
def test_ablation_figure_draws_each_line_as_a_function_of_the_layer():
    """H1's grid has two random controls (random, random_lens_pullback) per layer: each panel
    draws one of them, so no line goes back and forth between them along the layers."""
    rows = []
    for layer in range(4):
        for basis, subspace, kl in (
            ("unembed", "output", 2.0),
            ("unembed", "internal", 1.0),
            ("lens_pullback", "output", 5.0),
            ("lens_pullback", "internal", 4.0),
            ("random", "random", 0.5),
            ("random_lens_pullback", "random", 8.0),
        ):
            rows.append(
                {
                    "layer": layer,
                    "subspace": subspace,
                    "k": 4,
                    "basis": basis,
                    "mode": "zero",
                    "site": "residual",
                    "kl": kl + layer,
                    "kl_lo": kl + layer - 0.1,
                    "kl_hi": kl + layer + 0.1,
                    "n_tokens": 100,
                    "n_draws": 2 if subspace == "random" else 1,
                    "draw_min": kl + layer - 0.3,
                    "draw_max": kl + layer + 0.3,
                }
            )
    ablation = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # rows in any order
    fig = plots.ablation_axes(ablation, "H1")
    try:
        titles = [ax.get_title().split(" | ")[0] for ax in fig.axes]
        assert titles == ["lens_pullback", "unembed"]  # no panel of a control alone
        for ax in fig.axes:
            lines = [line for line in ax.get_lines() if line.get_label() != "_nolegend_"]
            assert len(lines) == 3  # output, internal, one control
            for line in lines:
                x = list(line.get_xdata())
                assert x == sorted(set(x)), (ax.get_title(), line.get_label(), x)
            control = [line for line in lines if "control" in line.get_label()]
            want = 8.0 if ax.get_title().startswith("lens_pullback") else 0.5
            assert list(control[0].get_ydata()) == [want + layer for layer in range(4)]
    finally:
        plots.plt.close(fig)


def test_benchmark_jobs_keep_only_the_named_runs(tmp_path):
    bench = "s\th:m:s\tmax_rss\tmax_vms\n{s}\t0:00:01\t{rss}\t1\n"
    for rel, s, rss in [
        ("h0_layer/run-a/0.tsv", 2.0, 100),
        ("h0_layer/run-a/1.tsv", 3.0, 300),
        ("prepare_model/model-a.tsv", 1.0, 50),
        ("h0_layer/other/0.tsv", 9.0, 900),
    ]:
        path = tmp_path / "benchmarks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(bench.format(s=s, rss=rss))
    jobs = provenance.benchmark_jobs(tmp_path, ["run-a", "model-a"])
    assert sorted(jobs["job"]) == ["model-a", "run-a/0", "run-a/1"]
    rules = provenance.per_rule(jobs).set_index("rule")
    assert rules.loc["h0_layer"].to_dict() == {
        "jobs": 2,
        "total_s": 5.0,
        "max_s": 3.0,
        "peak_rss_mb": 300.0,
    }
    assert len(provenance.benchmark_jobs(tmp_path)) == 4


def test_config_hash_ignores_key_order():
    assert provenance.config_hash({"a": 1, "b": {"c": 2, "d": 3}}) == provenance.config_hash(
        {"b": {"d": 3, "c": 2}, "a": 1}
    )
    assert provenance.config_hash({"a": 1}) != provenance.config_hash({"a": 2})


# ------------------------------------------------------------------ the page from hand-made results
def _png(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20), color).save(path)


@pytest.fixture
def results(tmp_path):
    """A results folder of one GPT-2-sized 'paper' run (12 layers, d = 8) with H0 only."""
    res = tmp_path / "results"
    run = "paper"
    layers = range(12)
    lens = [
        (layer, lens, kl, kl * 0.9, kl * 1.1, 64)
        for layer in layers
        for lens, kl in (("tuned", 0.1 + layer / 10), ("logit", 3.0 - layer / 10))
    ]
    (res / run).mkdir(parents=True)
    pd.DataFrame(lens, columns=["layer", "lens", "kl", "kl_lo", "kl_hi", "n_tokens"]).to_csv(
        res / run / "lens_eval.tsv", sep="\t", index=False
    )
    rows, cells = [], {}
    for layer in layers:
        for basis in ("unembed", "unembed_centered"):
            rows.append(
                (
                    layer,
                    "output",
                    4,
                    basis,
                    "zero",
                    "pre_norm",
                    10.0 + layer,
                    9.0 + layer,
                    11.0 + layer,
                )
            )
            rows.append((layer, "internal", 4, basis, "zero", "pre_norm", 1.0, 0.9, 1.1))
            cells[(layer, "output", basis)] = [[b + 10.0 + layer for b in BASE]]
            cells[(layer, "internal", basis)] = [BASE]
        rows.append((layer, "random", 4, "random", "zero", "pre_norm", 3.0, 2.5, 3.5))
        cells[(layer, "random", "random")] = [[b + 2 for b in BASE], [b + 2.5 for b in BASE]]
    (res / run / "h0").mkdir()
    pd.DataFrame([(*r, 64) for r in rows], columns=ABLATION_COLUMNS).to_csv(
        res / run / "h0" / "ablation.tsv", sep="\t", index=False
    )
    robustness.compare(per_sequence(cells), n_boot=2000).to_csv(
        res / run / "h0" / "comparisons.tsv", sep="\t", index=False
    )
    _png(res / "figures" / f"lens_{run}.png")
    _png(res / "figures" / f"h0_{run}.png")
    manifest = tmp_path / "resources" / "models" / "gpt2" / "lensspace-model.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"d_model": 8}))
    config = {
        "runs": {
            run: {
                "model": "gpt2",
                "corpus": "wiki",
                "lens": {"source": "pretrained", "id": "gpt2"},
                "reference": {"h0": "H0.2"},
            }
        },
        "models": {"gpt2": {"source": "hub", "id": "gpt2", "n_layers": 12}},
        "bootstrap": {"n_resamples": 500},
    }
    return tmp_path, config


def registry(root: Path, config: dict) -> list[dict]:
    """The report's experiment list for a hand-made results folder under ``root``, in the
    workflow's layout (what rule html_report passes; files that do not exist are skipped)."""
    res = root / "results"

    def ablation(run: str, key: str, **extra: str) -> dict:
        return {
            "ablation": f"{res}/{run}/{key}/ablation.tsv",
            "comparisons": f"{res}/{run}/{key}/comparisons.tsv",
            "table": f"{res}/tables/{key}_{run}.md",
            "figure": f"{res}/figures/{key}_{run}.png",
            **{name: f"{res}/{run}/{key}/{file}" for name, file in extra.items()},
        }

    def files(run: str) -> dict:
        model = config["runs"][run]["model"]
        h1 = ablation(run, "h1", heads="heads.tsv", heads_test="heads_test.tsv", mlp="mlp.tsv")
        return {
            "model": {"manifest": {model: f"{root}/resources/models/{model}/lensspace-model.json"}},
            "lens": {
                "lens_eval": f"{res}/{run}/lens_eval.tsv",
                "figure": f"{res}/figures/lens_{run}.png",
            },
            "h0": ablation(run, "h0", shares="shares.tsv"),
            "h1": {**h1, "heads_figure": f"{res}/figures/h1_heads_{run}.png"},
            "h2": ablation(run, "h2", fit="fit.tsv"),
            "shuffle": {
                "swaps": f"{res}/{run}/shuffle/swaps.tsv",
                "conditions": f"{res}/{run}/shuffle/conditions.tsv",
                "figure": f"{res}/figures/shuffle_{run}.png",
            },
        }

    per_run = {run: files(run) for run in config["runs"]}
    return [
        {
            "name": name,
            "section": None if name == "model" else f"lensspace.report.{name}",
            "files": {run: per_run[run][name] for run in per_run},
        }
        for name in ("model", "lens", "h0", "h1", "h2", "shuffle")
    ]


def _build(tmp_path, config) -> str:
    return build(
        config,
        registry(tmp_path, config),
        results=tmp_path / "results",
        reference=ROOT / "reference" / "seed_tables.tsv",
        workflow_dir=ROOT,
    )


def test_page_has_every_section_with_published_numbers_and_generated_captions(results):
    tmp_path, config = results
    page = _build(tmp_path, config)
    sections = re.findall(r"data-section='([^']+)'", page)
    assert sections == ["findings", "lens-quality", "h0", "provenance"]
    # the findings state each verdict with its procedure, from comparisons.tsv, after a plain
    # sentence of what the experiment found, from its table (output 10 + layer, internal 1)
    text = html.unescape(page)
    assert '"output > internal" holds in 24' in text and "Holm" in page
    headline = (
        "H0: SVD subspaces ablated in lens space: Ablating the output subspace costs 16 times "
        "the KL of ablating the internal subspace at every one of layers 0–11 (median over "
        "layers, from 10 to 21 times; basis unembed, zero ablation, pre_norm, k = 4)."
    )
    assert headline in text
    assert text.index(headline) < text.index('"output > internal" holds in 24')
    assert "Lens quality: The tuned lens has a lower held-out KL" in text
    assert page.count('src="data:image/png;base64,') == 2
    # the original layout at k = d/2 = 4, the published H0.2 beside it, with the difference
    assert "published output" in page and "Δ output" in page
    assert "<td>5.726</td>" in page  # H0.2 layer 0, published output
    assert f"<td>{10.0 - 5.726:.3f}</td>" in page  # reproduced - published
    # captions say what, where, how, on how many tokens, and the interval, from the data
    assert "k = 4 of 8 (d/2)" in page and "mean over 64 held-out token positions" in page
    assert "500 resamples" in page and "layers 0–11" in page
    assert "The tuned lens has a lower held-out KL than the logit lens at 12 of 12 layers" in page
    assert "holds in 24 of 24 cells" in page  # output > internal, 2 bases x 12 layers
    assert provenance.config_hash(config) in page
    assert "seaborn" in page and "pandas" in page  # package versions


def test_sections_follow_the_files_that_exist(results):
    tmp_path, config = results
    res = tmp_path / "results" / "paper"
    shutil.copytree(res / "h0", res / "h1")
    ablation = pd.read_csv(res / "h1" / "ablation.tsv", sep="\t")
    ablation["site"] = "residual"
    ablation.to_csv(res / "h1" / "ablation.tsv", sep="\t", index=False)
    pd.DataFrame(
        {
            "layer": [0],
            "head": [1],
            "induction_score": [0.9],
            "output_fraction": [0.5],
            "internal_fraction": [0.1],
        }
    ).to_csv(res / "h1" / "heads.tsv", sep="\t", index=False)
    shutil.copytree(res / "h0", res / "h2")
    ablation = ablation[ablation["basis"] != "unembed_centered"].copy()  # H2 has one basis: W_E's
    ablation["site"], ablation["basis"] = (
        "embedding",
        ablation["basis"].where(ablation["subspace"] == "random", "embed"),
    )
    ablation.to_csv(res / "h2" / "ablation.tsv", sep="\t", index=False)
    pd.DataFrame(
        {
            "layer": range(12),
            "r2": 0.5,
            "kl_lens_route": 1.0,
            "kl_downstream_route": 2.0,
            "n_tokens": 64,
        }
    ).to_csv(res / "h2" / "fit.tsv", sep="\t", index=False)
    _png(res.parent / "figures" / "h2_paper.png")
    (res / "shuffle").mkdir()
    pd.DataFrame(
        {
            "i": [0, 0, 1, 0],
            "j": [1, 2, 2, 2],
            "space": ["native"] * 4,
            "kl": [0.1, 0.2, 0.3, 0.4],
            "kl_lo": [0.0] * 4,
            "kl_hi": [0.5] * 4,
            "top1_agreement": [0.9] * 4,
            "n_tokens": [64] * 4,
            "kind": ["swap"] * 3 + ["window"],
        }
    ).to_csv(res / "shuffle" / "swaps.tsv", sep="\t", index=False)
    page = _build(tmp_path, config)
    assert re.findall(r"data-section='([^']+)'", page) == [
        "findings",
        "lens-quality",
        "h0",
        "h1",
        "h2",
        "shuffle",
        "provenance",
    ]
    assert "site residual" in page and "induction_score" in page and "Swap cost" in page
    assert "R²" in page and "input (top-k right singular vectors of W_E)" in page
    assert "Permutations within windows" in page
    assert page.count('src="data:image/png;base64,') == 3


# ------------------------------------------------------------------ the tiny run's page in Chromium
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
]

CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const sections = [...document.querySelectorAll('[data-section]')].map(s => {
    const run = s.closest('[data-run]');
    return (run ? run.dataset.run + '/' : '') + s.dataset.section;
  });
  const marker = document.createElement('pre');
  marker.id = 'lensspace-check';
  marker.textContent = JSON.stringify({images: images.length, broken, sections});
  document.body.appendChild(marker);
});
</script>"""


@pytest.fixture(scope="session")
def chromium():
    """The chromium binary; installed with apt-get (Debian's package) where it is missing."""
    found = shutil.which("chromium")
    if found is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip(
                "Chromium is not installed, and apt-get as root is not available to install it"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600, env=env)
        done = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
            capture_output=True,
            text=True,
            timeout=1200,
            env=env,
        )
        found = shutil.which("chromium")
        if found is None:
            pytest.skip(
                f"Chromium could not be installed with apt-get: {done.stderr.strip()[-500:]}"
            )
    return found


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.workflow
def test_tiny_page_loads_in_chromium(tiny_run, chromium, tmp_path):
    workdir, config = tiny_run
    results = workdir / "results"
    page = results / "report" / "index.html"
    assert page.exists()
    for run in config["runs"]:
        assert (results / "tables" / f"robustness_h0_{run}.md").exists()

    # Every image loads and every section is there: a copy of the page with a script that
    # writes what it finds into the DOM, dumped once the page has loaded.
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
        encoding="utf-8",
    )
    dumped = run_chromium(
        chromium,
        tmp_path / "profile-dom",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    )
    found = re.search(r'<pre id="lensspace-check">(.*?)</pre>', dumped.stdout, re.S)
    assert found, f"no check marker in the DOM; chromium said: {dumped.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    assert check["broken"] == []
    expected = {"provenance"}
    for run in config["runs"]:
        expected |= {f"{run}/lens-quality", f"{run}/h0"}
        for key, produced in (
            ("h1", "h1/ablation.tsv"),
            ("h2", "h2/ablation.tsv"),
            ("shuffle", "shuffle/swaps.tsv"),
        ):
            if (results / run / produced).exists():
                expected.add(f"{run}/{key}")
    assert expected <= set(check["sections"]), set(check["sections"])
    figures = list((results / "figures").glob("*.png"))
    assert check["images"] == len(figures) > 0  # every figure of the run is on the page

    # A screenshot of the page itself (no script) is not blank.
    shot = tmp_path / "page.png"
    run_chromium(
        chromium,
        tmp_path / "profile-shot",
        "--window-size=1200,2400",
        f"--screenshot={shot}",
        page.as_uri(),
    )
    assert shot.exists(), "chromium wrote no screenshot"
    gray = Image.open(shot).convert("L")
    assert gray.size == (1200, 2400)
    assert ImageStat.Stat(gray).stddev[0] > 20, "the screenshot is (almost) uniform"
    non_white = sum(gray.histogram()[:230])
    assert non_white > 0.02 * gray.size[0] * gray.size[1]


@pytest.mark.workflow
def test_snakemake_report_archive(tiny_run):
    workdir, _ = tiny_run
    done = snakemake(
        workdir,
        "--configfile",
        str(workdir / "study.yaml"),
        "--report",
        "results/report.zip",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import zipfile

    names = zipfile.ZipFile(workdir / "results" / "report.zip").namelist()
    assert any(n.endswith("report.html") for n in names)
    assert any(n.endswith("index.html") for n in names) and any(
        "robustness_h0_" in n for n in names
    )
    assert any(n.endswith(".png") or "lens_" in n for n in names)
