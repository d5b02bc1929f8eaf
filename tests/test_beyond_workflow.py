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
        measured = pd.read_csv(results / run / "neurons" / "measured.tsv", sep="\t")
        last = neurons[neurons["layer"] == n_layers - 1]
        assert neurons["layer"].nunique() == n_layers
        assert set(measured["neuron"]) == set(last.loc[last["role"].notna(), "neuron"])
        # every measured neuron and its matched ones were ablated: the last block only
        assert neurons["mediated_share"].notna().sum() >= config["neurons"]["n_matched"]
        assert (neurons.loc[neurons["mediated_share"].notna(), "layer"] == n_layers - 1).all()
        for name in ("kl_total", "abs_dh_total", "mediated_share"):
            assert (measured[f"{name}_lo"] <= measured[name] + 1e-12).all()
            assert (measured[name] <= measured[f"{name}_hi"] + 1e-12).all()
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
