"""The whole DAG, run for real by Snakemake on the tiny config in a temporary folder."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT, snakemake
from safetensors.torch import load_file
from tuned_lens.nn import TunedLens

from lensspace.models import build_random_model


def test_every_contract_output_is_well_formed(tiny_run):
    workdir, config = tiny_run
    results = workdir / "results"
    for run, spec in config["runs"].items():
        n_layers = config["models"][spec["model"]]["n_layers"]
        tokens = load_file(results / run / "data" / "tokens.safetensors")
        assert tokens["train"].dtype == torch.int32 and tokens["train"].shape == (24, 32)
        assert tokens["eval"].shape == (8, 32)

        lens_eval = pd.read_csv(results / run / "lens_eval.tsv", sep="\t")
        assert list(lens_eval.columns) == ["layer", "lens", "kl", "kl_lo", "kl_hi", "n_tokens"]
        assert len(lens_eval) == 2 * n_layers and (lens_eval["n_tokens"] == 8 * 31).all()
        assert (lens_eval["kl_lo"] <= lens_eval["kl"]).all() and (
            lens_eval["kl"] <= lens_eval["kl_hi"]
        ).all()

        spectrum = pd.read_csv(results / run / "svd" / "spectrum.tsv", sep="\t")
        assert list(spectrum.columns) == ["basis", "index", "singular_value"]
        assert set(spectrum["basis"]) == {"unembed", "unembed_centered"}

        h0 = pd.read_csv(results / run / "h0" / "ablation.tsv", sep="\t")
        contract = [
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
        assert list(h0.columns) == [
            *contract,
            "n_draws",
            "draw_sd",
            "draw_min",
            "draw_max",
            "edit_rel",
        ]
        random = h0[h0["subspace"] == "random"]
        assert (random["n_draws"] == config["random_draws"]).all()
        assert (random["draw_min"] <= random["kl"]).all() and (
            random["kl"] <= random["draw_max"]
        ).all()
        assert sorted(h0["layer"].unique()) == list(range(n_layers))
        assert set(h0["k"]) == {4, 16} and set(h0["subspace"]) == {"output", "internal", "random"}
        assert (h0["kl"] >= 0).all() and h0["kl"].notna().all()
        assert len(h0) == n_layers * 2 * 2 * 2 * (2 * 2 + 1)

        h1 = pd.read_csv(results / run / "h1" / "ablation.tsv", sep="\t")
        assert list(h1.columns) == list(h0.columns)
        assert set(h1["basis"]) == {
            "unembed",
            "unembed_centered",
            "lens_pullback",
            "random",
            "random_lens_pullback",
        }
        for hypothesis, table in (("h0", h0), ("h1", h1)):
            seqs = pd.read_csv(results / run / hypothesis / "per_sequence.tsv", sep="\t")
            assert len(seqs) == 8 * (
                (table["subspace"] != "random").sum()
                + config["random_draws"] * (table["subspace"] == "random").sum()
            )
            comparisons = pd.read_csv(results / run / hypothesis / "comparisons.tsv", sep="\t")
            assert set(comparisons["verdict"]) <= {"holds", "reversed", "not separable"}
            assert (comparisons["p_adjusted"] >= comparisons["p_value"] - 1e-12).all()
        shares = pd.read_csv(results / run / "h0" / "shares.tsv", sep="\t")
        assert (
            shares["share"] - shares["constant_share"] - shares["varying_share"]
        ).abs().max() < 1e-5  # 6 digits in the TSV
        assert set(h1["site"]) == {"residual"} and (h1["kl"] >= 0).all()
        heads = pd.read_csv(results / run / "h1" / "heads.tsv", sep="\t")
        assert len(heads) == n_layers * 4
        assert (
            heads["induction_score"].between(0, 1).all()
            and heads["output_fraction"].between(0, 1).all()
        )
        test = pd.read_csv(results / run / "h1" / "heads_test.tsv", sep="\t")
        assert {"statistic", "p_value", "n_induction"} <= set(test.columns)
        assert len(pd.read_csv(results / run / "h1" / "mlp.tsv", sep="\t")) == n_layers

        fit = pd.read_csv(results / run / "h2" / "fit.tsv", sep="\t")
        assert sorted(fit["layer"]) == list(range(n_layers))
        assert fit["r2"].iloc[0] == pytest.approx(1.0, abs=1e-3)  # E_0 maps the embedding to itself
        assert (fit[["kl_lens_route", "kl_downstream_route"]] >= 0).all().all()
        h2 = pd.read_csv(results / run / "h2" / "ablation.tsv", sep="\t")
        assert list(h2.columns) == list(h0.columns) and set(h2["site"]) == {"embedding"}
        swaps = pd.read_csv(results / run / "shuffle" / "swaps.tsv", sep="\t")
        assert {"i", "j", "space", "kl", "kl_lo", "kl_hi", "top1_agreement", "n_tokens"} <= set(
            swaps.columns
        )
        pairs = swaps[swaps["kind"] == "swap"]
        assert len(pairs) == 3 * n_layers * (n_layers - 1) // 2  # all pairs, three spaces
        assert (pairs["kl"] > 0).all() and pairs["top1_agreement"].between(0, 1).all()
        assert set(swaps["space"]) == {"native", "lens", "lens_ridge"}
        assert swaps["distortion"].isna().eq(swaps["space"] == "native").all()
        assert (swaps.loc[swaps["space"] == "lens_ridge", "ridge"] == 10).all()
        assert (swaps["kind"] == "window").sum() == 3 * 3
        conditions = pd.read_csv(results / run / "shuffle" / "conditions.tsv", sep="\t")
        assert len(conditions) == 2 * n_layers and (conditions["condition_number"] >= 1).all()
        assert set(conditions["lens"]) == {"lens", "lens_ridge"}
        assert (results / run / "shuffle" / "ridge_lens" / "params.pt").exists()

        for hypothesis in ("h0", "h1", "h2"):
            assert "| layer |" in (results / "tables" / f"{hypothesis}_{run}.md").read_text()
        table = (results / "tables" / f"h0_{run}.md").read_text()
        assert "| layer | KL ablate internal | KL ablate output |" in table
        assert (
            len(
                [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
            )
            == n_layers
        )
        for figure in (
            f"h0_{run}.png",
            f"lens_{run}.png",
            f"h1_{run}.png",
            f"h1_heads_{run}.png",
            f"h2_{run}.png",
            f"shuffle_{run}.png",
        ):
            data = (results / "figures" / figure).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_written_lens_loads_in_tuned_lens(tiny_run):
    workdir, config = tiny_run
    model, _ = build_random_model(config["models"]["tiny-gpt2"])
    lens = TunedLens.from_model_and_pretrained(
        model, str(workdir / "results" / "tiny-gpt2" / "lens")
    )
    assert len(lens) == 3
    assert any(t.weight.abs().sum() > 0 for t in lens.layer_translators)


def test_pretrained_lens_is_copied_unchanged(tiny_run):
    workdir, _ = tiny_run
    theirs = torch.load(workdir / "their-lens" / "params.pt", weights_only=True)
    ours = torch.load(
        workdir / "results" / "tiny-llama-pretrained" / "lens" / "params.pt", weights_only=True
    )
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_second_run_has_nothing_to_do(tiny_run):
    workdir, _ = tiny_run
    again = snakemake(workdir, "--configfile", str(workdir / "study.yaml"), "-n")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.workflow
def test_lint_is_clean(tmp_path):
    lint = snakemake(tmp_path, "--lint", timeout=300)
    assert lint.returncode == 0
    assert "Lints for" not in lint.stdout + lint.stderr


@pytest.mark.workflow
def test_offline_hub_model_gives_one_clear_error(tmp_path):
    target = "resources/models/gpt2/lensspace-model.json"
    done = snakemake(
        tmp_path,
        target,
        "--configfile",
        str(ROOT / "configs" / "paper-gpt2.yaml"),
        timeout=300,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "model 'gpt2' (hub id 'gpt2') could not be fetched" in out
    assert "config.yaml" in out
    assert "Traceback" not in out


@pytest.mark.workflow
@pytest.mark.parametrize(
    "name, model, hub_id",
    [
        ("pythia-160m.yaml", "pythia-160m", "EleutherAI/pythia-160m-deduped"),
        ("qwen2.5-0.5b.yaml", "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"),
    ],
)
def test_family_examples_offline_give_one_clear_error(tmp_path, name, model, hub_id):
    target = f"resources/models/{model}/lensspace-model.json"
    done = snakemake(
        tmp_path,
        target,
        "--configfile",
        str(ROOT / "configs" / name),
        timeout=300,
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert f"model '{model}' (hub id '{hub_id}') could not be fetched" in out
    assert "Traceback" not in out
    assert not (tmp_path / "resources" / "models" / model / "model.safetensors").exists()


@pytest.mark.workflow
def test_unknown_family_stops_before_any_job(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["models"]["tiny-gpt2"]["arch"] = "mamba"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "--configfile", str(tmp_path / "bad.yaml"), "-n", timeout=300)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "models.tiny-gpt2.arch: model_type 'mamba' has no architecture adapter" in out
    assert "src/lensspace/adapter.py" in out
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


@pytest.mark.workflow
def test_bad_config_stops_before_any_job(tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["h0"]["sites"] = ["pre_norm", "postnorm"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "--configfile", str(tmp_path / "bad.yaml"), "-n", timeout=300)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "h0.sites[1]: 'postnorm' is not one of ['pre_norm', 'post_norm']" in out
    assert len(out.strip().splitlines()) <= 4, (
        out
    )  # the key, the value, the allowed ones: not the schema
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_every_model_job_logs_its_start_up(tiny_run):
    """Each job that loads the model logs the seconds from its process's start to the model
    loaded; ``provenance.logged_startups`` reads them back (what ``benchmarks/roofline.py``
    sums), each below its job's own benchmarked time."""
    from lensspace.provenance import benchmark_jobs, logged_startups

    workdir, _ = tiny_run
    logged = logged_startups(workdir / "results")
    loaders = {
        path.stem for path in (ROOT / "scripts").glob("*.py") if "open_model(" in path.read_text()
    }
    ran = benchmark_jobs(workdir / "results")
    expected = ran[
        ran["rule"].isin(
            {
                "h0_layer",
                "h1_layer",
                "h2_layer",
                "svd",
                "train_lens",
                "eval_lens",
                "cache_activations",
                "h1_heads",
                "shuffle_pairs",
                "neurons",
            }
        )
    ]
    assert len(expected) >= 10 and {"h0_layer", "train_lens", "svd"} <= loaders
    merged = expected.merge(logged, on=["rule", "job"], how="left")
    assert merged["startup_s"].notna().all(), merged[merged["startup_s"].isna()]
    assert ((merged["startup_s"] > 0.5) & (merged["startup_s"] < merged["s"])).all(), merged
    assert (merged["kernels_s"] == 0).all()  # tiny models stay below fused.MIN_ELEMENTS: eager


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_seconds_counts_from_the_process_start():
    """``runtime.process_seconds`` includes what ran before lensspace was imported."""
    code = (
        "import time; time.sleep(1.5); from lensspace.runtime import process_seconds; "
        "a = process_seconds(); time.sleep(0.3); print(a, process_seconds())"
    )
    first, second = map(
        float,
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split(),
    )
    assert 1.5 <= first < 60 and 0.25 <= second - first < 5


def test_jobs_run_with_huge_pages(tiny_run):
    """Every job's process started with the allocator setting of lensspace.malloc (glibc reads it
    only at start, so it must come from the workflow's environment, not from the job itself)."""
    workdir, _ = tiny_run
    headers = [
        line
        for log in (workdir / "results" / "logs").rglob("*.log")
        for line in log.read_text().splitlines()
        if line.startswith("[lensspace] rule")
    ]
    assert len(headers) > 20
    assert all("glibc.malloc.hugetlb=1" in line.split("GLIBC_TUNABLES=")[1] for line in headers), (
        headers[:3]
    )
