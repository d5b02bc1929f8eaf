"""Lens quality sweep: more training tokens give a lens no worse on held-out tokens (real model),
the sweep's rows hold the H0 cells' paired verdicts, each row says what was trained (a reverted
refinement is least squares, on the real model where it happens), and the full budget is the
run's own lens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cached

from lensspace.experiments.grid import AblationGrid
from lensspace.experiments.lens_quality import (
    LensQualitySettings,
    TrainSubset,
    budget_label,
    held_out_kl,
    sweep,
    trained_label,
)
from lensspace.lenses import LensTraining, fit_lens, held_out_sequences, train_lens
from lensspace.subspaces import unembedding_bases


def test_more_training_tokens_is_not_worse_on_held_out_tokens(real):
    adapter, cache = real.adapter, real.cache
    layers = [4, 14, 24]
    settings = LensTraining(refine_steps=0)
    small = train_lens(adapter, TrainSubset(cache, 6), settings, "small", layers=layers)
    full = train_lens(adapter, cache, settings, "full", layers=layers)
    final = cache.final("eval")[:, 1:]
    logp = adapter.logits(final).log_softmax(-1)
    for layer in layers:
        kl_small = held_out_kl(adapter, small, cache, layer)
        kl_full = held_out_kl(adapter, full, cache, layer)
        assert float(kl_full.mean()) <= float(kl_small.mean())
        # the per-sequence KL against a direct computation over all held-out positions
        h = cache.load(layer, "eval")[:, 1:]
        translator = full.layer_translators[layer]
        with torch.no_grad():
            direct = (
                (logp.exp() * (logp - adapter.logits(h + translator(h)).log_softmax(-1)))
                .sum(-1)
                .mean(1)
            )
        assert torch.allclose(kl_full, direct.double(), rtol=1e-4, atol=1e-5)
    # the layers outside the list were left untrained (the logit lens)
    assert float(full.layer_translators[0].weight.detach().abs().max()) == 0


def test_train_subset_sees_only_the_first_training_sequences(tiny, tmp_path):
    adapter, _ = tiny
    cached = make_cached(adapter, tmp_path / "cache", seed=2, n_train=8, n_eval=3, seq_len=10)
    subset = TrainSubset(cached.cache, 3)
    assert torch.equal(subset.load(1, "train"), cached.cache.load(1, "train")[:3])
    assert torch.equal(subset.final("eval"), cached.cache.final("eval"))
    assert budget_label(0.125, False) == "1/8 lstsq" and budget_label(1.0, True) == "all lstsq+kl"
    assert trained_label(0.125, True, True) == "1/8 lstsq+kl"
    assert trained_label(0.125, True, False) == "1/8 lstsq, kl reverted"
    assert trained_label(0.125, True, None) == "1/8 lstsq"  # no refinement ran
    assert trained_label(1.0, False, None) == "all lstsq"


def test_a_layers_translator_is_the_same_whichever_layers_are_trained(tiny, tmp_path):
    """Refinement seeded per layer: the sweep's lens at its layers is the run's own lens there."""
    adapter, _ = tiny
    cached = make_cached(adapter, tmp_path / "cache", seed=6, n_train=8, n_eval=2, seq_len=16)
    settings = LensTraining(
        refine_steps=3, refine_batch_tokens=16, refine_tokens=64, check_tokens=15
    )
    every = fit_lens(adapter, cached.cache, settings, "all")
    some = fit_lens(adapter, cached.cache, settings, "some", layers=[1])
    mine, theirs = every.lens.layer_translators[1], some.lens.layer_translators[1]
    assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
    assert some.refinement_kept == {1: every.refinement_kept[1]}
    assert set(every.refinement_kept) == set(range(adapter.n_layers))


def test_sweep_rows_hold_paired_verdicts(tiny, tmp_path):
    adapter, _ = tiny
    cached = make_cached(adapter, tmp_path / "cache", seed=4, n_train=8, n_eval=4, seq_len=16)
    grid = AblationGrid(
        bases=("unembed",),
        sites=("pre_norm",),
        n_boot=200,
        random_draws=2,
        experiment="lens_quality",
    )
    settings = LensQualitySettings(
        fractions=(0.5, 1.0), refine=(False, True), layers=(0, 2), grid=grid, test_resamples=200
    )
    training = LensTraining(
        refine_steps=2, refine_batch_tokens=16, refine_tokens=64, check_tokens=15
    )
    rows, sequences = sweep(adapter, cached.cache, unembedding_bases(adapter), training, settings)
    assert len(rows) == 2 * 2 * 2 * 2 and len(sequences) == len(rows) * 4
    for row in rows:
        assert row["diff"] == pytest.approx(row["kl_output"] - row["kl_internal"], abs=1e-9)
        assert row["diff_lo"] <= row["diff"] <= row["diff_hi"]
        assert row["lens_kl_lo"] <= row["lens_kl"] <= row["lens_kl_hi"]
    # Holm over the sweep's 16 points, computed here: sorted p times (m - rank + 1), running max
    p = sorted((r["p_value"], i) for i, r in enumerate(rows))
    running = 0.0
    for rank, (value, i) in enumerate(p):
        running = max(running, min(1.0, (len(p) - rank) * value))
        assert rows[i]["p_adjusted"] == pytest.approx(running)
        expected = (
            "not separable"
            if running >= 0.05
            else "output > internal"
            if rows[i]["diff"] > 0
            else "internal > output"
        )
        assert rows[i]["verdict"] == expected
    assert {r["train_tokens"] for r in rows} == {4 * 15, 8 * 15}
    # with the refinement, one training sequence (check_tokens 15 / 15 per sequence) is held out
    # of the fit
    assert {(r["refine"], r["train_tokens"], r["lstsq_tokens"]) for r in rows} == {
        (False, 60, 60),
        (False, 120, 120),
        (True, 60, 45),
        (True, 120, 105),
    }
    assert {r["n_tokens"] for r in rows} == {4 * 15}
    # each row names what its layer's lens is; the run's own lens is the full refined budget
    for row in rows:
        if row["refine"]:
            assert row["refine_kept"] in (True, False)
            assert row["trained"].endswith("kl reverted") != row["refine_kept"]
        else:
            assert row["refine_kept"] is None and row["trained"].endswith(" lstsq")
        assert row["run_lens"] == (row["fraction"] == 1.0 and row["refine"])
    not_trained = sweep(
        adapter,
        cached.cache,
        unembedding_bases(adapter),
        training,
        settings,
        run_lens_trained=False,
    )[0]
    assert not any(row["run_lens"] for row in not_trained)
    # a run whose own lens has no refinement: both full budgets are that lens
    plain = sweep(
        adapter,
        cached.cache,
        unembedding_bases(adapter),
        LensTraining(refine_steps=0),
        settings,
    )[0]
    assert {(r["refine"], r["trained"]) for r in plain if r["run_lens"]} == {
        (False, "all lstsq"),
        (True, "all lstsq"),
    }


def test_small_budget_refinement_is_reverted_and_labelled_so_on_the_real_model(real):
    """SmolLM2 on three training sequences: the refinement's check reverts it at layer 29 (a lens
    fitted on two sequences overfits its refinement tokens), so that lens is the least-squares fit
    on the sequences the check left, and its row says so; on all 24 sequences it is kept."""
    adapter, cache = real.adapter, real.cache
    layers = [15, 29]
    training = LensTraining()
    small = fit_lens(adapter, TrainSubset(cache, 3), training, "small", layers=layers)
    full = fit_lens(adapter, cache, training, "full", layers=layers)
    assert small.refinement_kept[29] is False
    assert full.refinement_kept == {15: True, 29: True}
    fitted = 3 - len(held_out_sequences(3, cache.load(0, "train").shape[1], training))
    plain = train_lens(
        adapter, TrainSubset(cache, fitted), LensTraining(refine_steps=0), "ls", layers
    )
    for layer in layers:
        same = torch.equal(
            small.lens.layer_translators[layer].weight, plain.layer_translators[layer].weight
        )
        assert same != small.refinement_kept[layer]
        label = trained_label(0.125, True, small.refinement_kept[layer])
        assert label == (
            "1/8 lstsq+kl" if small.refinement_kept[layer] else "1/8 lstsq, kl reverted"
        )
