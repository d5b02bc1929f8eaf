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
from PIL import Image, ImageStat

from conftest import ROOT, snakemake
from lensspace import provenance, robustness
from lensspace.report import build, html_grid, lens_quality_table

ABLATION_COLUMNS = ["layer", "subspace", "k", "basis", "mode", "site", "kl", "kl_lo", "kl_hi", "n_tokens"]


def ablation_tsv(tmp_path: Path, rows: list[tuple]) -> pd.DataFrame:
    """Rows (layer, subspace, k, basis, mode, site, kl, kl_lo, kl_hi) written and read as a TSV."""
    path = tmp_path / "ablation.tsv"
    pd.DataFrame([(*r, 100) for r in rows], columns=ABLATION_COLUMNS).to_csv(path, sep="\t", index=False)
    return pd.read_csv(path, sep="\t")


# ------------------------------------------------------------------ robustness
def test_verdict_compares_intervals():
    assert robustness.verdict(2.0, 3.0, 0.5, 1.0) == "holds"
    assert robustness.verdict(0.5, 1.0, 2.0, 3.0) == "reversed"
    assert robustness.verdict(1.0, 2.0, 1.5, 2.5) == "not separable"
    assert robustness.verdict(1.0, 2.0, 2.0, 3.0) == "not separable"  # touching intervals overlap


@pytest.fixture
def hand_made(tmp_path):
    z, pre = "zero", "pre_norm"
    return ablation_tsv(tmp_path, [
        # layer 0: output clearly above internal in both bases; random in between
        (0, "output", 4, "unembed", z, pre, 2.5, 2.0, 3.0),
        (0, "internal", 4, "unembed", z, pre, 0.7, 0.5, 1.0),
        (0, "output", 4, "unembed_centered", z, pre, 0.4, 0.3, 0.5),   # reversed vs internal
        (0, "internal", 4, "unembed_centered", z, pre, 1.5, 1.2, 1.8),
        (0, "random", 4, "random", z, pre, 1.5, 1.4, 1.6),
        # layer 1: overlapping intervals everywhere
        (1, "output", 4, "unembed", z, pre, 1.6, 1.0, 2.0),
        (1, "internal", 4, "unembed", z, pre, 1.8, 1.5, 2.5),
        (1, "output", 4, "unembed_centered", z, pre, 1.6, 1.0, 2.0),
        (1, "internal", 4, "unembed_centered", z, pre, 1.8, 1.5, 2.5),
        (1, "random", 4, "random", z, pre, 1.7, 1.1, 2.2),
    ])


def test_classify_judges_every_conclusion_variant_and_layer(hand_made):
    verdicts = robustness.classify(hand_made)
    assert list(verdicts.columns) == ["conclusion", "basis", "mode", "site", "k", "layer", "verdict", "kl_a", "kl_b"]
    # 3 conclusions x 2 bases x 2 layers: the random control is compared with each basis
    assert len(verdicts) == 12
    got = {(r.conclusion, r.basis, r.layer): r.verdict for r in verdicts.itertuples()}
    assert got[("output > internal", "unembed", 0)] == "holds"
    assert got[("output > internal", "unembed_centered", 0)] == "reversed"
    assert got[("output > random", "unembed", 0)] == "holds"
    assert got[("output > random", "unembed_centered", 0)] == "reversed"
    assert got[("random > internal", "unembed", 0)] == "holds"
    assert got[("random > internal", "unembed_centered", 0)] == "not separable"
    assert {v for (c, b, layer), v in got.items() if layer == 1} == {"not separable"}
    row = verdicts[(verdicts["conclusion"] == "output > internal") & (verdicts["basis"] == "unembed")
                   & (verdicts["layer"] == 0)].iloc[0]
    assert (row["kl_a"], row["kl_b"]) == (2.5, 0.7)


def test_summary_and_grid(hand_made):
    verdicts = robustness.classify(hand_made)
    counts = robustness.summary(verdicts).set_index("conclusion")
    assert counts.loc["output > internal"].to_dict() == {"holds": 1, "reversed": 1, "not separable": 2, "cells": 4}
    wide = robustness.grid(verdicts)
    assert list(wide.columns) == ["conclusion", "basis", "mode", "site", "k", 0, 1]
    assert len(wide) == 6 and list(dict.fromkeys(wide["conclusion"])) == [c.label for c in robustness.CONCLUSIONS]


def test_markdown_grid_layout(hand_made):
    text = robustness.markdown_grid(robustness.classify(hand_made))
    lines = text.splitlines()
    assert lines[0] == "| conclusion | basis | mode | site | k | L0 | L1 |"
    assert "| output > internal | unembed | zero | pre_norm | 4 | ✓ | · |" in lines
    assert "| output > internal | unembed_centered | zero | pre_norm | 4 | ✗ | · |" in lines
    assert "- output > internal: holds in 1 of 4 cells, reversed in 1, not separable in 2" in lines


def test_html_grid_has_one_row_per_variant(hand_made):
    page = html_grid(robustness.classify(hand_made))
    assert page.count("<tr>") == 2 + 2  # two header rows, two variants (bases)
    assert page.count('class="v holds') == 3 and page.count('class="v reversed') == 2


def test_classify_without_control_or_with_missing_columns(tmp_path):
    frame = ablation_tsv(tmp_path, [(0, "output", 4, "unembed", "zero", "pre_norm", 2.0, 1.5, 2.5),
                                    (0, "internal", 4, "unembed", "zero", "pre_norm", 1.0, 0.5, 1.2)])
    assert set(robustness.classify(frame)["conclusion"]) == {"output > internal"}
    with pytest.raises(Exception, match="missing: \\['kl_hi'\\]"):
        robustness.classify(frame.drop(columns="kl_hi"))


# ------------------------------------------------------------------ tables and provenance
def test_lens_quality_table():
    frame = pd.DataFrame({"layer": [0, 0, 1, 1], "lens": ["tuned", "logit"] * 2,
                          "kl": [0.5, 2.0, 0.004, 1.0], "kl_lo": [0.4, 1.5, 0.003, 0.9],
                          "kl_hi": [0.6, 2.5, 0.005, 1.1], "n_tokens": 10})
    table = lens_quality_table(frame)
    assert list(table.columns) == ["layer", "tuned KL", "tuned 95% CI", "logit KL", "logit 95% CI"]
    assert table["tuned KL"].tolist() == [0.5, 0.004]
    assert table["tuned 95% CI"].tolist() == ["[0.400, 0.600]", "[0.003, 0.005]"]


def test_benchmark_jobs_keep_only_the_named_runs(tmp_path):
    bench = "s\th:m:s\tmax_rss\tmax_vms\n{s}\t0:00:01\t{rss}\t1\n"
    for rel, s, rss in [("h0_layer/run-a/0.tsv", 2.0, 100), ("h0_layer/run-a/1.tsv", 3.0, 300),
                        ("prepare_model/model-a.tsv", 1.0, 50), ("h0_layer/other/0.tsv", 9.0, 900)]:
        path = tmp_path / "benchmarks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(bench.format(s=s, rss=rss))
    jobs = provenance.benchmark_jobs(tmp_path, ["run-a", "model-a"])
    assert sorted(jobs["job"]) == ["model-a", "run-a/0", "run-a/1"]
    rules = provenance.per_rule(jobs).set_index("rule")
    assert rules.loc["h0_layer"].to_dict() == {"jobs": 2, "total_s": 5.0, "max_s": 3.0, "peak_rss_mb": 300.0}
    assert len(provenance.benchmark_jobs(tmp_path)) == 4


def test_config_hash_ignores_key_order():
    assert provenance.config_hash({"a": 1, "b": {"c": 2, "d": 3}}) == provenance.config_hash({"b": {"d": 3, "c": 2}, "a": 1})
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
    lens = [(layer, lens, kl, kl * 0.9, kl * 1.1, 64) for layer in layers
            for lens, kl in (("tuned", 0.1 + layer / 10), ("logit", 3.0 - layer / 10))]
    (res / run).mkdir(parents=True)
    pd.DataFrame(lens, columns=["layer", "lens", "kl", "kl_lo", "kl_hi", "n_tokens"]).to_csv(
        res / run / "lens_eval.tsv", sep="\t", index=False)
    rows = []
    for layer in layers:
        for basis in ("unembed", "unembed_centered"):
            rows.append((layer, "output", 4, basis, "zero", "pre_norm", 10.0 + layer, 9.0 + layer, 11.0 + layer))
            rows.append((layer, "internal", 4, basis, "zero", "pre_norm", 1.0, 0.9, 1.1))
        rows.append((layer, "random", 4, "random", "zero", "pre_norm", 3.0, 2.5, 3.5))
    (res / run / "h0").mkdir()
    pd.DataFrame([(*r, 64) for r in rows], columns=ABLATION_COLUMNS).to_csv(
        res / run / "h0" / "ablation.tsv", sep="\t", index=False)
    _png(res / "figures" / f"lens_{run}.png")
    _png(res / "figures" / f"h0_{run}.png")
    manifest = tmp_path / "resources" / "models" / "gpt2" / "lensspace-model.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"d_model": 8}))
    config = {"runs": {run: {"model": "gpt2", "corpus": "wiki", "lens": {"source": "pretrained", "id": "gpt2"},
                             "reference": {"h0": "H0.2"}}},
              "models": {"gpt2": {"source": "hub", "id": "gpt2", "n_layers": 12}},
              "bootstrap": {"n_resamples": 500}}
    return tmp_path, config


def _build(tmp_path, config) -> str:
    return build(config, results=tmp_path / "results", reference=ROOT / "reference" / "seed_tables.tsv",
                 resources=tmp_path / "resources", workflow_dir=ROOT)


def test_page_has_every_section_with_published_numbers_and_generated_captions(results):
    tmp_path, config = results
    page = _build(tmp_path, config)
    sections = re.findall(r"data-section='([^']+)'", page)
    assert sections == ["lens-quality", "h0", "provenance"]
    assert page.count('src="data:image/png;base64,') == 2
    # the original layout at k = d/2 = 4, the published H0.2 beside it, with the difference
    assert "published output" in page and "Δ output" in page
    assert "<td>5.726</td>" in page                        # H0.2 layer 0, published output
    assert f"<td>{10.0 - 5.726:.3f}</td>" in page           # reproduced - published
    # captions say what, where, how, on how many tokens, and the interval, from the data
    assert "k = 4 of 8 (d/2)" in page and "mean over 64 held-out token positions" in page
    assert "500 resamples" in page and "layers 0–11" in page
    assert "The tuned lens has a lower held-out KL than the logit lens at 12 of 12 layers" in page
    assert "holds in 24 of 24 cells" in page               # output > internal, 2 bases x 12 layers
    assert provenance.config_hash(config) in page
    assert "seaborn" in page and "pandas" in page           # package versions


def test_sections_follow_the_files_that_exist(results):
    tmp_path, config = results
    res = tmp_path / "results" / "paper"
    shutil.copytree(res / "h0", res / "h1")
    ablation = pd.read_csv(res / "h1" / "ablation.tsv", sep="\t")
    ablation["site"] = "residual"
    ablation.to_csv(res / "h1" / "ablation.tsv", sep="\t", index=False)
    pd.DataFrame({"layer": [0], "head": [1], "induction_score": [0.9], "output_fraction": [0.5],
                  "internal_fraction": [0.1]}).to_csv(res / "h1" / "heads.tsv", sep="\t", index=False)
    shutil.copytree(res / "h0", res / "h2")
    ablation = ablation[ablation["basis"] != "unembed_centered"].copy()  # H2 has one basis: W_E's
    ablation["site"], ablation["basis"] = "embedding", ablation["basis"].where(ablation["subspace"] == "random", "embed")
    ablation.to_csv(res / "h2" / "ablation.tsv", sep="\t", index=False)
    pd.DataFrame({"layer": range(12), "r2": 0.5, "kl_lens_route": 1.0, "kl_downstream_route": 2.0,
                  "n_tokens": 64}).to_csv(res / "h2" / "fit.tsv", sep="\t", index=False)
    _png(res.parent / "figures" / "h2_paper.png")
    (res / "shuffle").mkdir()
    pd.DataFrame({"i": [0, 0, 1, 0], "j": [1, 2, 2, 2], "space": ["native"] * 4, "kl": [0.1, 0.2, 0.3, 0.4],
                  "kl_lo": [0.0] * 4, "kl_hi": [0.5] * 4, "top1_agreement": [0.9] * 4,
                  "n_tokens": [64] * 4, "kind": ["swap"] * 3 + ["window"]}).to_csv(
        res / "shuffle" / "swaps.tsv", sep="\t", index=False)
    page = _build(tmp_path, config)
    assert re.findall(r"data-section='([^']+)'", page) == ["lens-quality", "h0", "h1", "h2", "shuffle",
                                                            "provenance"]
    assert "site residual" in page and "induction_score" in page and "Swap cost" in page
    assert "R²" in page and "input (top-k right singular vectors of W_E)" in page
    assert "Permutations within windows" in page
    assert page.count('src="data:image/png;base64,') == 3


# ------------------------------------------------------------------ the tiny run's page in Chromium
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
                  "--disable-dev-shm-usage"]

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
            pytest.skip("Chromium is not installed, and apt-get as root is not available to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600, env=env)
        done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                              capture_output=True, text=True, timeout=1200, env=env)
        found = shutil.which("chromium")
        if found is None:
            pytest.skip(f"Chromium could not be installed with apt-get: {done.stderr.strip()[-500:]}")
    return found


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


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
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
                     encoding="utf-8")
    dumped = run_chromium(chromium, tmp_path / "profile-dom", "--virtual-time-budget=10000", "--dump-dom",
                          probe.as_uri())
    found = re.search(r'<pre id="lensspace-check">(.*?)</pre>', dumped.stdout, re.S)
    assert found, f"no check marker in the DOM; chromium said: {dumped.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    assert check["broken"] == []
    expected = {"provenance"}
    for run in config["runs"]:
        expected |= {f"{run}/lens-quality", f"{run}/h0"}
        for key, produced in (("h1", "h1/ablation.tsv"), ("h2", "h2/ablation.tsv"), ("shuffle", "shuffle/swaps.tsv")):
            if (results / run / produced).exists():
                expected.add(f"{run}/{key}")
    assert expected <= set(check["sections"]), set(check["sections"])
    figures = list((results / "figures").glob("*.png"))
    assert check["images"] == len(figures) > 0  # every figure of the run is on the page

    # A screenshot of the page itself (no script) is not blank.
    shot = tmp_path / "page.png"
    run_chromium(chromium, tmp_path / "profile-shot", "--window-size=1200,2400", f"--screenshot={shot}",
                 page.as_uri())
    assert shot.exists(), "chromium wrote no screenshot"
    gray = Image.open(shot).convert("L")
    assert gray.size == (1200, 2400)
    assert ImageStat.Stat(gray).stddev[0] > 20, "the screenshot is (almost) uniform"
    non_white = sum(gray.histogram()[:230])
    assert non_white > 0.02 * gray.size[0] * gray.size[1]


@pytest.mark.workflow
def test_snakemake_report_archive(tiny_run):
    workdir, _ = tiny_run
    done = snakemake(workdir, "--configfile", str(workdir / "study.yaml"), "--report", "results/report.zip",
                     timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import zipfile
    names = zipfile.ZipFile(workdir / "results" / "report.zip").namelist()
    assert any(n.endswith("report.html") for n in names)
    assert any(n.endswith("index.html") for n in names) and any("robustness_h0_" in n for n in names)
    assert any(n.endswith(".png") or "lens_" in n for n in names)
