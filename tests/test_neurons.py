"""Single MLP neurons: geometry against independent computations; the last block's ablation,
total and with the norm's scale frozen, against the model's own forward pass; the rank p-value's
level when a neuron is just another matched neuron; and on the real model, a planted entropy
neuron found and a planted ordinary neuron rejected."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from conftest import make_cached, model_head

from lensspace.errors import LensspaceError
from lensspace.experiments.neurons import (
    FinalResidualAblation,
    LastBlock,
    NeuronSettings,
    linear_write,
    matched_pool,
    measured_neurons,
    mediated_share,
    neuron_geometry,
    null_space,
    rank_p_value,
    reference_matches,
    run_neurons,
)
from lensspace.robustness import ALPHA
from lensspace.stats import adjust
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
    post = adapter.mlp_write_norm(0)
    if post is not None:  # Gemma 2/3: the residual receives g * w
        w = w / (post.weight.detach().double() + 1.0)
    weights = adapter.neuron_out_weights(0)
    w = w / w.norm() * float(weights.norm(dim=1).max()) * 3
    original = weights[5].clone()
    with torch.no_grad():
        weights[5] = w.float()
    yield adapter, cached
    with torch.no_grad():
        weights[5] = original


def test_planted_bottom_subspace_neuron_lies_in_the_internal_subspace(planted):
    adapter, cached = planted
    d = adapter.d_model
    basis = unembedding_bases(adapter)["unembed"].vectors
    table = neuron_geometry(adapter, cached.lens, basis, d // 2)
    layer0 = table[table["layer"] == 0].set_index("neuron")
    assert layer0.loc[5, "internal_fraction"] == pytest.approx(1.0, abs=1e-4)
    assert layer0.loc[5, "output_fraction"] == pytest.approx(0.0, abs=1e-4)
    # the other neurons do not: random directions split about evenly
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
    # a random direction of the space the norm outputs: its expected share is k / dim
    dim = d - 1 if adapter.norm_kind == "layernorm" else d
    assert table["null_random"].sub(max(3, kernel) / dim).abs().max() < 1e-12
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
            post = adapter.mlp_write_norm(layer)
            if post is not None:  # Gemma 2/3: the write runs through that norm's gain
                w = w * (post.weight.detach().double() + 1.0)
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


def _final(adapter, ids, hook=None):
    """The final residual before the norm, from the model's own forward pass (``hook`` on the last
    MLP's down projection, if given)."""
    store: dict = {}
    handle = adapter.mlp_out(adapter.n_layers - 1).register_forward_pre_hook(hook) if hook else None
    try:
        with torch.no_grad(), adapter.capture_residuals(store):
            adapter.model(ids, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    return store[adapter.n_layers]


def test_last_block_ablation_matches_the_models_forward_pass_total_and_scale_frozen(tiny, tmp_path):
    """Total: the model run with the neuron's activation replaced by its mean. Direct: that
    ablated residual through the model's head with the norm's scale of the clean residual."""
    adapter, _ = tiny
    cached = make_cached(adapter, tmp_path / "cache", seed=5, n_train=4, n_eval=3, seq_len=12)
    last = adapter.n_layers - 1
    weights = adapter.neuron_out_weights(last).detach()
    means = torch.linspace(-0.5, 0.5, len(weights))
    block = LastBlock(adapter, cached.cache, 3)
    z, activations = block.clean()
    neurons = [2, 9]
    rerun = None if linear_write(adapter) else block.ablated
    got = FinalResidualAblation(adapter, z, activations, means, rerun, chunk=5).effects(
        neurons, weights
    )
    if linear_write(adapter):  # the rank-one shortcut against the block run again
        slow = FinalResidualAblation(adapter, z, activations, means, block.ablated, chunk=5)
        for name, values in slow.effects(neurons, weights).items():
            assert torch.allclose(got[name], values, atol=1e-5), name
    ids = cached.tokens["eval"].long()
    final = _final(adapter, ids)
    clean = model_head(adapter, final)[:, 1:].double().log_softmax(-1)

    def entropy(logp):
        return -(logp.exp() * logp).sum(-1)

    centred = adapter.centre(final.double())
    clean_scale = centred.square().mean(-1, keepdim=True).add(adapter.norm_eps).sqrt()
    if adapter.norm_kind == "none":
        clean_scale = torch.ones_like(clean_scale)
    for i, j in enumerate(neurons):

        def hook(_module, args, j=j):
            a = args[0].clone()
            a.view(len(ids), ids.shape[1], -1)[:, 1:, j] = means[j]  # OPT: flat tokens
            return (a,)

        ablated = _final(adapter, ids, hook)
        total = model_head(adapter, ablated)[:, 1:].double().log_softmax(-1)
        if adapter.norm_kind == "none":  # no final norm (OPT-350m): no scale to freeze
            direct = total
        else:
            frozen = adapter.centre(ablated.double()) / clean_scale
            direct = model_head(adapter, adapter.norm_affine(frozen.float()), after_norm=True)
            direct = direct[:, 1:].double().log_softmax(-1)
        dh_total = entropy(total) - entropy(clean)
        dh_direct = entropy(direct) - entropy(clean)
        scale = adapter.centre(ablated.double()).square().mean(-1).add(adapter.norm_eps).sqrt()
        if adapter.norm_kind == "none":
            scale = torch.ones_like(scale)
        expected = {
            "abs_dh_total": dh_total.abs(),
            "abs_dh_direct": dh_direct.abs(),
            "abs_dh_mediated": (dh_total - dh_direct).abs(),
            "kl_total": (clean.exp() * (clean - total)).sum(-1),
            "kl_direct": (clean.exp() * (clean - direct)).sum(-1),
            "top1_total": (clean.argmax(-1) != total.argmax(-1)).double(),
            "top1_direct": (clean.argmax(-1) != direct.argmax(-1)).double(),
            "d_log_scale": (scale.log() - clean_scale.squeeze(-1).log())[:, 1:].abs(),
        }
        for name, values in expected.items():
            assert torch.allclose(got[name][i], values.mean(1), atol=2e-4), name
        assert float(got["kl_total"][i].sum()) > 1e-5  # the ablation does something here


def _last_block(norms, nulls, null_random=0.01) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": 3,
            "neuron": range(len(norms)),
            "norm": norms,
            "null_fraction": nulls,
            "null_random": null_random,
        }
    )


def test_measured_neurons_are_candidates_by_null_share_the_largest_and_the_published():
    norms = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]
    nulls = [0.05, 0.5, 0.02, 0.2, 0.09, 0.11, 0.9, 0.01]
    earlier = _last_block([100.0] * 8, [0.9] * 8).assign(layer=2)  # never measured
    table = pd.concat([earlier, _last_block(norms, nulls)], ignore_index=True)
    settings = NeuronSettings(k=4, null_k=1, null_ratio=10, n_candidates=3, n_largest=2)
    got = measured_neurons(table, settings, published=[7])
    # candidates: null share >= 10 x 0.01, the three largest norms among them: 1, 3, 5
    assert list(got["neuron"]) == [0, 1, 3, 5, 7]  # largest norm first
    assert list(got["role"]) == [
        "largest",
        "candidate+largest",
        "candidate",
        "candidate",
        "published",
    ]
    assert (got["layer"] == 3).all()


def test_matched_pool_is_nearest_in_log_norm_to_the_measured_and_never_one_of_them():
    table = _last_block([float(2**n) for n in range(20)], [0.0] * 20)
    measured = table[table["neuron"].isin([10, 19])]
    # log2 norms 0..19: nearest to 10 or 19 are 9, 11 (distance 1), 18 (1), 8, 12, 17 (2), ...
    assert matched_pool(table, measured, 3) == [9, 11, 18]
    assert set(matched_pool(table, measured, 6)) == {8, 9, 11, 12, 17, 18}
    with pytest.raises(LensspaceError, match="neurons.n_matched"):
        matched_pool(table, measured, 19)


def test_rank_p_value_holds_its_level_when_the_neuron_is_just_another_matched_neuron():
    """Draw the measured neuron at random from a population of n_matched + 1 exchangeable neurons
    (heavy-tailed and tied values, as per-neuron effects are), as the default tests 12 neurons:
    each p-value rejects at most its level, and Holm over the 12 keeps the family-wise error."""
    gen = torch.Generator().manual_seed(0)
    n_matched, n_sims, n_measured = 300, 2000, 12
    levels = (0.01, 0.05, 0.2)
    rejected = dict.fromkeys(levels, 0)
    family_errors = 0
    for _ in range(n_sims):
        ps = []
        for _ in range(n_measured):
            population = (torch.randn(n_matched + 1, generator=gen, dtype=torch.float64) * 2).exp()
            population = population.round(decimals=1)  # ties
            pick = int(torch.randint(n_matched + 1, (1,), generator=gen))
            others = torch.cat([population[:pick], population[pick + 1 :]])
            ps.append(rank_p_value(float(population[pick]), others))
        for level in levels:
            rejected[level] += ps[0] <= level
        family_errors += min(adjust(ps, "holm")) < ALPHA
    for level in levels:
        se = (level * (1 - level) / n_sims) ** 0.5
        assert rejected[level] / n_sims <= level + 3 * se, level
    assert family_errors / n_sims <= ALPHA + 3 * (ALPHA * (1 - ALPHA) / n_sims) ** 0.5
    # and the test can reject: a neuron above all of its matched ones gets 1 / (n_matched + 1)
    assert rank_p_value(2.0, torch.ones(n_matched)) == 1 / (n_matched + 1)


def test_mediated_share_is_a_share():
    share = mediated_share(torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert share.tolist() == [0.0, 0.5, 0.75]


def test_settings_from_config_size_the_null_space_from_d_model():
    config = {
        "neurons": {
            "null_share": 0.01,
            "null_ratio": 10,
            "n_candidates": 8,
            "n_largest": 4,
            "n_matched": 300,
            "min_mediated_share": 0.5,
            "eval_sequences": 8,
            "mean_sequences": 32,
        },
        "bootstrap": {"n_resamples": 1000},
        "seed": 0,
    }
    assert NeuronSettings.from_config(config, 576).null_k == 6  # SmolLM2: 1% of 576
    assert NeuronSettings.from_config(config, 768).null_k == 8  # GPT-2 small
    assert NeuronSettings.from_config(config, 32).null_k == 1  # at least one direction


def test_reference_neurons_report_rank_share_and_the_verdict_where_measured():
    table = _last_block([3.0, 1.0, 2.0], [0.2, 0.4, 0.6])
    table = pd.concat([table.assign(layer=2), table], ignore_index=True)
    measured = pd.DataFrame(
        {
            "neuron": [1],
            "role": ["published"],
            "mediated_share": [0.8],
            "p_mediated_share_adjusted": [0.01],
            "entropy_neuron": [True],
        }
    )
    reference = pd.DataFrame({"layer": [3, 2], "neuron": [1, 2]})
    got = reference_matches(table, measured, reference)
    assert got.loc[0, "norm_rank_in_layer"] == 3 and got.loc[0, "entropy_neuron"]
    assert got.loc[1, "norm_rank_in_layer"] == 2 and pd.isna(got.loc[1, "mediated_share"])
    with pytest.raises(LensspaceError, match="3.7 does not exist"):
        reference_matches(table, measured, pd.DataFrame({"layer": [3], "neuron": [7]}))


def _real_settings(adapter, **changes) -> NeuronSettings:
    base = NeuronSettings(
        k=adapter.d_model // 2,
        null_k=max(1, round(0.01 * adapter.d_model)),
        n_candidates=2,
        n_largest=1,
        n_matched=40,
        eval_sequences=3,
        mean_sequences=4,
        n_boot=200,
    )
    return dataclasses.replace(base, **changes)


def _run_real(real, settings: NeuronSettings, published=()):
    """The experiment on the real model, its lens and cache, in the unembed basis."""
    basis = unembedding_bases(real.adapter)["unembed"].vectors
    return run_neurons(
        real.adapter, real.lens, real.cache, basis, real.tokens, settings, published=published
    )


def test_run_on_the_real_model_measures_last_block_neurons_against_matched_ones(real):
    """SmolLM2: candidates by the published geometry and the largest-norm neuron, each ablated
    beside its matched neurons; the level of the rank p-value on these neurons' own shares."""
    adapter = real.adapter
    last = adapter.n_layers - 1
    settings = _real_settings(adapter)
    table, measured = _run_real(real, settings)
    assert len(table) == adapter.n_layers * adapter.neuron_out_weights(0).shape[0]
    assert (table["null_k"] == 6).all()
    ablated = table[table["mediated_share"].notna()]
    assert (ablated["layer"] == last).all() and len(ablated) >= settings.n_matched
    assert ablated["mediated_share"].between(0, 1).all()
    # per token |total - direct| <= |total| + |direct|: so are the means
    assert (
        ablated["abs_dh_mediated"] <= ablated["abs_dh_total"] + ablated["abs_dh_direct"] + 1e-9
    ).all()
    assert "largest" in measured["role"].iloc[0]  # the layer's largest-norm neuron, first
    candidates = measured[measured["role"].str.contains("candidate")]
    assert len(candidates) == 2
    assert (candidates["null_fraction"] >= 10 * candidates["null_random"]).all()
    for name in ("abs_dh_total", "kl_total", "mediated_share"):
        assert (measured[f"{name}_lo"] <= measured[name] + 1e-12).all()
        assert (measured[name] <= measured[f"{name}_hi"] + 1e-12).all()
    assert measured["p_mediated_share"].between(1 / 41, 1).all()
    assert (measured["p_mediated_share_adjusted"] >= measured["p_mediated_share"]).all()
    assert measured["verdict_possible"].all() and measured["final_norm"].all()


def test_planted_entropy_neuron_passes_and_planted_ordinary_neuron_fails_on_the_real_model(real):
    """Two of SmolLM2's smallest last-block neurons rewritten with twice the block's largest
    norm: one into the effective null space (an entropy neuron by construction), one along the
    direction the logits read most (an ordinary, logit-moving neuron)."""
    adapter = real.adapter
    last = adapter.n_layers - 1
    weights = adapter.neuron_out_weights(last)
    norms = weights.detach().norm(dim=1)
    small = norms.argsort()[:2].tolist()
    null = null_space(adapter, 6)
    w_u = adapter.unembedding.detach().double()
    folded = (w_u - w_u.mean(0)) * adapter.norm_gain.detach().double()
    top = torch.linalg.svd(folded, full_matrices=False).Vh[0]
    size = 2 * float(norms.max())
    original = weights[small].detach().clone()
    try:
        with torch.no_grad():
            weights[small[0]] = (null[:, 0] * size).float()
            weights[small[1]] = (top * size).float()
        settings = _real_settings(adapter, n_candidates=0, n_largest=0, n_matched=60)
        _, measured = _run_real(real, settings, published=small)
    finally:
        with torch.no_grad():
            weights[small] = original
    rows = measured.set_index("neuron")
    entropy, ordinary = rows.loc[small[0]], rows.loc[small[1]]
    assert entropy["null_fraction"] > 0.99 and ordinary["null_fraction"] < 0.01
    assert entropy["entropy_neuron"] and entropy["mediated_share"] >= settings.min_mediated_share
    assert entropy["p_mediated_share_adjusted"] < ALPHA
    assert not ordinary["entropy_neuron"] and ordinary["mediated_share"] < 0.1
    # the scale changes more for the entropy neuron, the ranking far more for the ordinary one
    assert entropy["d_log_scale"] > ordinary["d_log_scale"]
    assert ordinary["top1_total"] > 3 * entropy["top1_total"]


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
