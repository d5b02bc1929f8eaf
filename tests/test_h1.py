"""H1 and circuit ends: the pull-back identity, residual ablations, induction score, head writes."""

import pytest
import torch

from conftest import make_cached
from lensspace.experiments.circuits import (CircuitSettings, depth_bins, head_and_mlp_fractions,
                                            induction_pattern_score, induction_scores,
                                            permutation_test, writes)
from lensspace.experiments.h0 import AblationGrid
from lensspace.experiments.h1 import residual_basis, run_layer
from lensspace.runner import BlockRunner
from lensspace.subspaces import ablate, project, pullback, select, unembedding_bases

D = 12


def _translator(seed=0):
    return torch.randn(D, D, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_pullback_of_identity_translator_is_the_basis_span():
    q = select(torch.linalg.qr(torch.randn(D, D))[0], "output", 5)
    p = pullback(torch.zeros(D, D), q)
    torch.testing.assert_close(project(torch.eye(D), p), project(torch.eye(D), q), atol=1e-5, rtol=0)


def test_pullback_is_orthonormal_and_carries_exactly_the_output_coordinates():
    a, b = _translator(), torch.randn(D)
    q = select(torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))[0], "output", 4)
    p = pullback(a, q)
    assert p.shape == (D, 4)
    torch.testing.assert_close(p.T @ p, torch.eye(4), atol=1e-5, rtol=0)

    def lens(h):
        return h + h @ a.T + b

    h = torch.randn(50, D)
    # the output coordinates of T(h) depend on h only through its component in the pull-back
    torch.testing.assert_close(lens(project(h, p)) @ q - b @ q, lens(h) @ q - b @ q, atol=1e-4, rtol=0)
    # so projecting the pull-back out of h leaves only the bias in those coordinates ...
    torch.testing.assert_close(lens(ablate(h, p, "zero")) @ q, (b @ q).expand(50, 4), atol=1e-4, rtol=0)
    # ... while the other coordinates do move unless (I + A) is orthogonal
    rest = select(torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1)))[0], "internal", D - 4)
    assert not torch.allclose(lens(ablate(h, p, "zero")) @ rest, lens(h) @ rest, atol=1e-3)


@pytest.fixture
def cached(tiny, tmp_path):
    c = make_cached(tiny[0], tmp_path / "cache", seed=3, n_train=4, n_eval=4, seq_len=10)
    return c.adapter, c.lens, c.cache, unembedding_bases(c.adapter), c.tokens


def test_residual_ablation_against_hooked_full_forward(cached):
    adapter, lens, cache, bases, tokens = cached
    runner = BlockRunner(adapter)
    grid = AblationGrid(subspaces=("output", "internal", "random"), ks=("half",),
                        bases=("unembed", "lens_pullback"), modes=("zero", "mean"),
                        sites=("residual",), n_boot=50)
    rows = run_layer(runner, lens, cache, bases, layer=1, grid=grid, chunk=3)
    assert len(rows) == (2 * 2 + 1) * 2
    assert all(r["kl"] >= 0 and r["site"] == "residual" and r["n_tokens"] == 4 * 9 for r in rows)
    # independent: the model's own forward with the subspace removed at block 1's input
    q = residual_basis(bases, lens, 1, "output", adapter.d_model // 2, "lens_pullback", 0)
    ids = tokens["eval"].long()

    def hook(_m, args, kwargs):
        h = args[0].clone()
        h[:, 1:] = ablate(h[:, 1:], q, "zero")
        return (h, *args[1:]), kwargs

    handle = adapter.blocks[1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ablated = adapter.model(ids).logits[:, 1:].log_softmax(-1)
    finally:
        handle.remove()
    clean = adapter.model(ids).logits[:, 1:].log_softmax(-1)
    expected = (clean.exp() * (clean - ablated)).sum(-1).mean()
    got = next(r for r in rows if (r["subspace"], r["basis"], r["mode"]) == ("output", "lens_pullback", "zero"))
    assert got["kl"] == pytest.approx(float(expected), rel=1e-3, abs=1e-7)


def test_induction_score_on_planted_and_uniform_patterns():
    half, t = 6, 12
    planted = torch.zeros(1, 2, t, t)
    for i in range(t):
        planted[0, :, i, 0] = 1.0  # before the second copy: attend to the first token
    for i in range(half, t):
        planted[0, 0, i] = 0
        planted[0, 0, i, i - half + 1] = 1.0  # head 0 is an induction head
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    scores = induction_pattern_score(planted, half)
    assert scores[0] == 1.0 and scores[1] == 0.0
    assert induction_pattern_score(uniform.expand(1, 1, t, t), half)[0] < 0.15


def test_head_writes_sum_to_attention_output(tiny, tiny_ids):
    adapter, _ = tiny
    heads, mlps = writes(adapter, tiny_ids)
    out_proj = adapter.attention_out(1)
    captured = {}
    handle = out_proj.register_forward_hook(lambda _m, _a, out: captured.setdefault("out", out))
    try:
        adapter.model(tiny_ids)
    finally:
        handle.remove()
    bias = out_proj.bias if out_proj.bias is not None else 0
    torch.testing.assert_close(heads[1].sum(dim=2) + bias, captured["out"], atol=1e-5, rtol=1e-5)
    assert mlps[1].shape == (*tiny_ids.shape, adapter.d_model)


def test_fractions_and_induction_scores_are_in_range(cached):
    adapter, lens, _, bases, tokens = cached
    (head_out, head_int), (mlp_out, mlp_int) = head_and_mlp_fractions(
        adapter, lens, bases, tokens["eval"], k=adapter.d_model // 2)
    for frac in (head_out, head_int, mlp_out, mlp_int):
        assert ((frac >= 0) & (frac <= 1 + 1e-9)).all()
    # after the last block the two halves of the unembedding basis are complements
    torch.testing.assert_close(head_out[-1] + head_int[-1], torch.ones(adapter.n_heads, dtype=torch.float64))
    scores = induction_scores(adapter, CircuitSettings(k=4, induction_sequences=2, induction_half_len=8), 256)
    assert scores.shape == (adapter.n_layers, adapter.n_heads)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_permutation_test():
    bins = depth_bins(6, 3)
    assert bins.tolist() == [0, 0, 1, 1, 2, 2]
    layer_bins = bins[:, None].expand(6, 4)
    flags = torch.zeros(6, 4, dtype=torch.bool)
    flags[:, 0] = True
    values = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    strong = values.clone()
    strong[:, 0] += 1.0
    result = permutation_test(strong, flags, layer_bins, n_permutations=500, seed=0)
    assert result["statistic"] > 0.8 and result["p_value"] < 0.01
    null = permutation_test(values, flags, layer_bins, n_permutations=500, seed=0)
    assert null["p_value"] > 0.05
    none = permutation_test(values, torch.zeros(6, 4, dtype=torch.bool), layer_bins, 10, 0)
    assert none["n_compared"] == 0
