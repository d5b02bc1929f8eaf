"""Single MLP neurons: geometry against independent computations, a planted bottom-subspace
neuron found, and the ablation's effects against a full forward pass of the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_cached

from lensspace.errors import LensspaceError
from lensspace.experiments.neurons import (
    COMPARED,
    NeuronAblation,
    NeuronSettings,
    add_verdicts,
    matched_neurons,
    neuron_geometry,
    null_space,
    pick_candidates,
    run_neurons,
)
from lensspace.runner import BlockRunner
from lensspace.subspaces import unembedding_bases


def _svd_right(adapter) -> torch.Tensor:
    """Right singular vectors of W_U (columns, descending), computed here independently."""
    _, _, vh = torch.linalg.svd(adapter.unembedding.detach().double(), full_matrices=True)
    return vh.T


@pytest.fixture
def planted(tiny, tmp_path):
    """A tiny model with a lens of random translators, and neuron 5 of block 0 rewritten to write
    (through translator 1) only into the bottom half of W_U's right singular vectors, with a
    large norm."""
    adapter, _ = tiny
    cached = make_cached(adapter, tmp_path / "cache", seed=7, n_train=6, n_eval=4, seq_len=16)
    v = _svd_right(adapter)
    d = adapter.d_model
    bottom = v[:, d - d // 2 :]
    coef = torch.randn(d // 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = bottom @ coef  # in lens space: only the bottom subspace
    m = (
        torch.eye(d, dtype=torch.float64)
        + cached.lens.layer_translators[1].weight.detach().double()
    )
    w = torch.linalg.solve(m, target)
    weights = adapter.neuron_out_weights(0)
    w = w / w.norm() * float(weights.norm(dim=1).max()) * 3
    original = weights[5].clone()
    with torch.no_grad():
        weights[5] = w.float()
    yield adapter, cached
    with torch.no_grad():
        weights[5] = original


def test_planted_bottom_subspace_neuron_is_found(planted):
    adapter, cached = planted
    d = adapter.d_model
    basis = unembedding_bases(adapter)["unembed"].vectors
    table = neuron_geometry(adapter, cached.lens, basis, d // 2)
    layer0 = table[table["layer"] == 0].set_index("neuron")
    assert layer0.loc[5, "internal_fraction"] == pytest.approx(1.0, abs=1e-4)
    assert layer0.loc[5, "output_fraction"] == pytest.approx(0.0, abs=1e-4)
    settings = NeuronSettings(
        k=d // 2,
        candidate_layers=tuple(range(adapter.n_layers)),
        n_candidates=1,
        min_internal_share=0.95,
    )
    found = pick_candidates(table, settings)
    assert list(zip(found["layer"], found["neuron"])) == [(0, 5)]
    # the other neurons do not pass: random directions split about evenly
    assert (table["internal_fraction"] >= 0.95).sum() == 1


def test_shares_and_logit_effect_match_direct_computation(tiny, tmp_path):
    adapter, _ = tiny
    cached = make_cached(adapter, tmp_path / "cache", seed=3, n_train=4, n_eval=2, seq_len=8)
    d, k, last = adapter.d_model, adapter.d_model // 2, adapter.n_layers - 1
    table = neuron_geometry(
        adapter, cached.lens, unembedding_bases(adapter)["unembed"].vectors, k, null_k=3
    )
    v = _svd_right(adapter)
    # the effective null space, independently: the eigenvectors of smallest eigenvalue of the
    # centred logits' Gram matrix P G F^T F G P (F = W_U - mean, G = diag(g), P the norm's
    # centring), among the directions the norm can output (LayerNorm: orthogonal to all-ones)
    w_u = adapter.unembedding.detach().double()
    f = (w_u - w_u.mean(0)) * adapter.norm_gain.detach().double()
    centring = (
        torch.eye(d, dtype=torch.float64) - 1 / d
        if adapter.norm_kind == "layernorm"
        else torch.eye(d, dtype=torch.float64)
    )
    values, vectors = torch.linalg.eigh(centring @ f.T @ f @ centring)
    if (
        adapter.norm_kind == "layernorm"
    ):  # the all-ones direction has eigenvalue 0: not an output direction
        ones = torch.full((d,), d**-0.5, dtype=torch.float64)
        vectors, values = (
            vectors[:, (vectors.T @ ones).abs() < 0.5],
            values[(vectors.T @ ones).abs() < 0.5],
        )
    kernel = int(
        (values <= values[-1] * 1e-10).sum()
    )  # an exact kernel (OPT-350m's project_out) is taken whole
    null = vectors[:, : max(3, kernel)]
    assert (table["null_k"] == max(3, kernel)).all()
    for layer in (0, last):
        m = (
            torch.eye(d, dtype=torch.float64)
            if layer == last
            else torch.eye(d, dtype=torch.float64)
            + cached.lens.layer_translators[layer + 1].weight.detach().double()
        )
        rows = table[table["layer"] == layer].set_index("neuron")
        for j in (0, 7):
            w = adapter.neuron_out_weights(layer)[j].detach().double()
            mw = m @ w
            share_in = float((v[:, d - k :].T @ mw).square().sum() / mw.square().sum())
            assert rows.loc[j, "internal_fraction"] == pytest.approx(share_in, rel=1e-6)
            assert rows.loc[j, "norm"] == pytest.approx(float(w.norm()), rel=1e-6)
            # a small step along M w after the final norm's normalisation, its scale frozen:
            # the logits move by (step) x the direct effect; only their spread can re-rank
            u = adapter.normalize(
                torch.randn(d, generator=torch.Generator().manual_seed(j))
            ).double()
            step = 1e-3
            centred = mw - mw.mean() if adapter.norm_kind == "layernorm" else mw
            share_null = float((null.T @ centred).square().sum() / centred.square().sum())
            assert rows.loc[j, "null_fraction"] == pytest.approx(share_null, rel=1e-5, abs=1e-9)
            # the direct effect is linear: before any final-logit soft-cap (Gemma 2)
            cap, adapter.logit_softcap = adapter.logit_softcap, None
            before = adapter.logits_from_normalized(u.float()).double()
            after = adapter.logits_from_normalized((u + step * centred).float()).double()
            adapter.logit_softcap = cap
            assert rows.loc[j, "logit_effect"] == pytest.approx(
                float((after - before).std() / step), rel=2e-2
            )


def test_ablation_effects_match_a_full_forward_pass(tiny, tmp_path):
    adapter, _ = tiny
    cached = make_cached(adapter, tmp_path / "cache", seed=5, n_train=4, n_eval=3, seq_len=12)
    layer, neurons = 1, [2, 9]
    n_neurons = adapter.neuron_out_weights(layer).shape[0]
    means = [torch.linspace(-0.5, 0.5, n_neurons) for _ in range(adapter.n_layers)]
    ablation = NeuronAblation(BlockRunner(adapter), cached.cache, means, n_sequences=3, chunk=2)
    got = ablation.effects({layer: neurons})

    ids = cached.tokens["eval"].long()
    clean = adapter.logits(_final(adapter, ids))[:, 1:].double().log_softmax(-1)

    def hook(_module, args):
        a = args[0].clone()
        a.view(len(ids), ids.shape[1], -1)[:, 1:, neurons] = means[layer][
            neurons
        ]  # OPT: flat tokens
        return (a,)

    handle = adapter.mlp_out(layer).register_forward_pre_hook(hook)
    try:
        ablated = adapter.logits(_final(adapter, ids))[:, 1:].double().log_softmax(-1)
    finally:
        handle.remove()
    entropy = lambda lp: -(lp.exp() * lp).sum(-1)  # noqa: E731
    d_entropy = entropy(ablated) - entropy(clean)
    kl = (clean.exp() * (clean - ablated)).sum(-1)
    top1 = (clean.argmax(-1) != ablated.argmax(-1)).double()
    assert torch.allclose(got["d_entropy"], d_entropy.mean(1), atol=2e-4)
    assert torch.allclose(got["abs_d_entropy"], d_entropy.abs().mean(1), atol=2e-4)
    assert torch.allclose(got["kl"], kl.mean(1), atol=2e-4)
    assert torch.allclose(got["top1_change"], top1.mean(1), atol=1e-9)
    assert float(got["kl"].sum()) > 1e-4  # the ablation does something on this model


def _final(adapter, ids):
    store: dict = {}
    with torch.no_grad(), adapter.capture_residuals(store):
        adapter.model(ids, use_cache=False)
    return store[adapter.n_layers]


def test_matched_neurons_are_same_layer_near_norm_distinct_and_not_candidates(planted):
    adapter, cached = planted
    d = adapter.d_model
    table = neuron_geometry(
        adapter, cached.lens, unembedding_bases(adapter)["unembed"].vectors, d // 2
    )
    settings = NeuronSettings(
        k=d // 2,
        candidate_layers=(1,),
        n_candidates=3,
        min_internal_share=0.0,
        random_draws=4,
        match_pool=5,
    )
    candidates = pick_candidates(table, settings)
    draws = matched_neurons(table, candidates, settings)
    layer1 = table[table["layer"] == 1].set_index("neuron")
    assert len(draws) == 4 and all(len(draw) == 3 for draw in draws)
    used = set(candidates["neuron"])
    for index, norm in enumerate(candidates["norm"]):
        mine = [draw[index] for draw in draws]
        assert len(set(mine)) == len(mine)  # without replacement
        nearest = (layer1.drop(index=sorted(used))["norm"] - norm).abs().nsmallest(5).index
        assert set(mine) <= set(nearest) and not set(mine) & used
        used |= set(mine)  # later candidates never reuse a control: the joint sets are disjoint
    with pytest.raises(LensspaceError, match="neurons.match_pool"):
        matched_neurons(table, candidates, dataclasses.replace(settings, match_pool=3))


def _row(p: float, diff: float, value: float, draw_max: float, ratio_lo: float = 0.0) -> dict:
    row = {
        "entropy_per_kl_lo": ratio_lo,
        "random_entropy_per_kl_draw_max": 1.0,
        "diff_top1_change_hi": 0.5,
    }
    for name in COMPARED:
        row.update(
            {
                f"p_{name}": p,
                f"diff_{name}": diff,
                name: value,
                f"random_{name}_draw_min": 0.0,
                f"random_{name}_draw_max": draw_max,
            }
        )
    return row


def test_verdicts_are_holm_corrected_and_need_the_draws_range():
    rows = [_row(0.001, 1.0, 5.0, 4.0), _row(0.001, 1.0, 3.0, 4.0), _row(0.02, 1.0, 5.0, 4.0)]
    add_verdicts(rows, top1_margin=0.01)
    # Holm over 9 p-values: the six of 0.001 become 9 x 0.001 .. (rank 6) 4 x 0.001; the three
    # of 0.02 3 x 0.02
    assert [rows[0][f"p_{n}_adjusted"] for n in COMPARED] == pytest.approx([0.009] * 3)
    assert [rows[2][f"p_{n}_adjusted"] for n in COMPARED] == pytest.approx([0.06] * 3)
    assert rows[0]["verdict_kl"] == "holds"
    assert (
        rows[1]["verdict_kl"] == "not separable"
    )  # significant, but inside the matched draws' range
    assert rows[2]["verdict_kl"] == "not separable"  # p 0.02 alone, 0.06 after Holm
    # the account needs |dH| to hold and evidence that top-1 barely moves: an interval bounded
    # by the margin
    assert not rows[0]["entropy_account"]
    unsure = _row(0.001, 1.0, 5.0, 4.0, ratio_lo=2.0)
    unsure.update({"p_top1_change": 0.9, "diff_top1_change": 0.0, "diff_top1_change_hi": 0.3})
    add_verdicts([unsure], top1_margin=0.01)
    assert unsure["verdict_top1_change"] == "not separable" and not unsure["entropy_account"]
    fits = dict(unsure, diff_top1_change_hi=0.005)
    add_verdicts([fits], top1_margin=0.01)
    assert fits["entropy_account"]
    low = dict(
        fits, entropy_per_kl_lo=0.9
    )  # the ratio's interval reaches below a matched draw's ratio
    add_verdicts([low], top1_margin=0.01)
    assert not low["entropy_account"]


def test_run_on_real_model_finds_last_layer_candidates(real):
    """SmolLM2: candidates of the last block, each ablated with its matched random neurons."""
    adapter = real.adapter
    settings = NeuronSettings(
        k=adapter.d_model // 2,
        candidate_layers=(adapter.n_layers - 1,),
        n_candidates=2,
        min_internal_share=0.5,
        random_draws=2,
        match_pool=8,
        eval_sequences=3,
        mean_sequences=4,
        n_boot=200,
        test_resamples=200,
    )
    table, candidates, joint = run_neurons(
        adapter,
        real.lens,
        real.cache,
        unembedding_bases(adapter)["unembed"].vectors,
        real.tokens,
        settings,
    )
    assert len(table) == adapter.n_layers * adapter.neuron_out_weights(0).shape[0]
    assert (
        table["internal_fraction"].between(0, 1).all()
        and table["output_fraction"].between(0, 1).all()
    )
    assert (table["output_fraction"] + table["internal_fraction"]).sub(1).abs().max() < 1e-6
    assert len(candidates) == 2 and (candidates["layer"] == adapter.n_layers - 1).all()
    for name in ("abs_d_entropy", "kl", "top1_change"):
        assert (candidates[f"{name}_lo"] <= candidates[name]).all()
        assert (candidates[name] <= candidates[f"{name}_hi"]).all()
    assert (candidates["kl"] > 0).all()
    assert len(joint) == 1 and joint["n_neurons"].iloc[0] == 2
    for name in COMPARED:
        assert candidates[f"verdict_{name}"].isin(["holds", "reversed", "not separable"]).all()
        assert (candidates[f"p_{name}_adjusted"] >= candidates[f"p_{name}"]).all()
    assert candidates["matched_norm_ratio"].between(0.3, 3).all()


def test_null_space_on_the_real_vocabulary_matches_the_gram_eigenvectors(real):
    """SmolLM2 (vocabulary 49,152 >> d 576, the case that once built a [vocab, vocab] U): the
    bottom directions equal the smallest-eigenvalue eigenvectors of F^T F, F the centred,
    gain-folded unembedding, computed independently."""
    adapter = real.adapter
    q = null_space(adapter, 6)
    w_u = adapter.unembedding.detach().double()
    f = (w_u - w_u.mean(0)) * adapter.norm_gain.detach().double()
    _, vectors = torch.linalg.eigh(f.T @ f)
    expected = vectors[:, :6]
    assert q.shape == (adapter.d_model, 6)
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=q.dtype), atol=1e-10)
    assert float((q @ q.T - expected @ expected.T).norm()) < 1e-8
