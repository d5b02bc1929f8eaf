"""The lens-quality sweep, out-of-distribution corpora and single neurons in the real Snakemake
run of the tiny config, with their tables, figures and report sections."""

from __future__ import annotations

import pandas as pd
import pytest

pytestmark = pytest.mark.workflow


def test_lens_quality_ood_and_neurons_outputs(tiny_run):
    workdir, config = tiny_run
    results = workdir / "results"
    for run, spec in config["runs"].items():
        n_layers = config["models"][spec["model"]]["n_layers"]
        sweep = pd.read_csv(results / run / "lens_quality" / "sweep.tsv", sep="\t")
        quality = config["lens_quality"]
        assert len(sweep) == len(quality["fractions"]) * len(quality["refine"]) * n_layers * len(
            quality["modes"]
        )
        assert (sweep["diff_lo"] <= sweep["diff"]).all() and (
            sweep["diff"] <= sweep["diff_hi"]
        ).all()
        assert (sweep["diff"] - (sweep["kl_output"] - sweep["kl_internal"])).abs().max() < 1e-5

        neurons = pd.read_csv(results / run / "neurons" / "neurons.tsv", sep="\t")
        assert neurons["layer"].nunique() == n_layers and neurons["is_candidate"].sum() == len(
            pd.read_csv(results / run / "neurons" / "candidates.tsv", sep="\t")
        )
        candidates = pd.read_csv(results / run / "neurons" / "candidates.tsv", sep="\t")
        assert (candidates["internal_fraction"] >= config["neurons"]["min_internal_share"]).all()
        for name in ("kl", "abs_d_entropy", "top1_change"):
            assert (candidates[f"{name}_lo"] <= candidates[name]).all()
            assert (candidates[name] <= candidates[f"{name}_hi"]).all()
        assert (results / "tables" / f"neurons_{run}.md").exists()
        assert (results / "figures" / f"neurons_{run}.png").stat().st_size > 0
        assert (results / "figures" / f"lens_quality_{run}.png").stat().st_size > 0

        corpora = spec.get("eval_corpora", [])
        for corpus in corpora:
            lens_eval = pd.read_csv(results / run / "ood" / corpus / "lens_eval.tsv", sep="\t")
            assert (
                len(lens_eval) == 2 * n_layers
            )  # the tiny config's h0 (and so ood) layers are all
            ablation = pd.read_csv(results / run / "ood" / corpus / "ablation.tsv", sep="\t")
            assert set(ablation["subspace"]) == {"output", "internal", "random"}
        assert (results / "tables" / f"ood_{run}.md").exists() == bool(corpora)
    assert any(spec.get("eval_corpora") for spec in config["runs"].values())
    page = (results / "report" / "index.html").read_text()
    for key in ("lens-budget", "neurons", "ood"):
        assert f"data-section='{key}'" in page
