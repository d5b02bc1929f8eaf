"""Circuit ends: induction score, head writes, their lens-space shares, the within-layer test."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_cached
from snakemake.utils import validate

from lensspace.experiments.circuits import (
    CircuitSettings,
    head_and_mlp_fractions,
    induction_pattern_score,
    induction_scores,
    layer_permutation_test,
    writes,
)
from lensspace.experiments.h1 import PULLED_BACK
from lensspace.lenses import translate
from lensspace.subspaces import select, unembedding_bases


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
    """The heads' writes plus the output bias are the attention's write into the residual: the
    output projection's output, or where a norm follows it (Gemma 2/3) that norm's output."""
    adapter, _ = tiny
    heads, mlps = writes(adapter, tiny_ids)
    out_proj = adapter.attention_out(1)
    write_norm = adapter.attention_write_norm(1)
    captured = {}
    handles = [
        (write_norm or out_proj).register_forward_hook(
            lambda _m, _a, out: captured.setdefault("out", out)
        ),
        adapter.mlp(1).register_forward_hook(lambda _m, _a, out: captured.setdefault("mlp", out)),
    ]
    try:
        adapter.model(tiny_ids)
    finally:
        for handle in handles:
            handle.remove()
    bias = out_proj.bias if out_proj.bias is not None else 0
    torch.testing.assert_close(heads[1].sum(dim=2) + bias, captured["out"], atol=1e-5, rtol=1e-5)
    assert mlps[1].shape == (*tiny_ids.shape, adapter.d_model)
    torch.testing.assert_close(
        mlps[1].reshape(-1, adapter.d_model), captured["mlp"].reshape(-1, adapter.d_model)
    )


def _plant(translator: torch.nn.Linear, a: torch.Tensor) -> None:
    with torch.no_grad():
        translator.weight.copy_(a.float())


def test_shares_are_lens_space_shares_under_planted_translators(tiny, tmp_path):
    """Block 0 writes into residual 1 (a shear from internal into output coordinates), block 1
    into residual 2 (output coordinates scaled by c), block 2 straight into the final norm."""
    adapter, _ = tiny
    c = make_cached(adapter, tmp_path / "cache", seed=5, n_train=2, n_eval=3, seq_len=9)
    bases = unembedding_bases(adapter)
    k = adapter.d_model // 2
    q_out = select(bases[PULLED_BACK].vectors, "output", k).double()
    q_int = select(bases[PULLED_BACK].vectors, "internal", k).double()
    rotation = torch.linalg.qr(
        torch.randn(k, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )[0]
    shear, scale = 2.0, 3.0
    _plant(c.lens.layer_translators[1], shear * q_out @ rotation @ q_int.T)
    _plant(c.lens.layer_translators[2], (scale - 1) * q_out @ q_out.T)
    heads, mlps = head_and_mlp_fractions(adapter, c.lens, bases, c.tokens["eval"], k, chunk=2)

    head_w, mlp_w = writes(adapter, c.tokens["eval"].long())
    for block, write, got in [
        (b, head_w[b][:, 1:, h], (heads, b, h)) for b in range(3) for h in (0, 2)
    ] + [(b, mlp_w[b][:, 1:], (mlps, b, ...)) for b in range(3)]:
        w = write.reshape(-1, adapter.d_model).double()
        x_out, x_int = w @ q_out, w @ q_int  # coordinates of w in the lens-space basis
        if block == 0:  # M w = w + shear q_out R q_int^T w
            x_out = x_out + shear * x_int @ rotation.T
        elif block == 1:  # M w scales the output coordinates
            x_out = scale * x_out
        out, internal = x_out.pow(2).sum(), x_int.pow(2).sum()
        shares, layer, head = got
        total = out + internal
        assert float(shares.output[layer, head]) == pytest.approx(float(out / total), rel=1e-6)
        assert float(shares.internal[layer, head]) == pytest.approx(
            float(internal / total), rel=1e-6
        )
        rms = float(w.pow(2).sum(-1).mean().sqrt())
        assert float(shares.write_norm[layer, head]) == pytest.approx(rms, rel=1e-6)
    # complementary halves of an orthonormal lens-space basis: the shares sum to one
    torch.testing.assert_close(heads.output + heads.internal, torch.ones_like(heads.output))
    torch.testing.assert_close(mlps.output + mlps.internal, torch.ones_like(mlps.output))


def test_shares_are_shares_and_induction_scores_are_in_range(tiny, tmp_path):
    adapter, _ = tiny
    c = make_cached(adapter, tmp_path / "cache", seed=3, n_train=2, n_eval=4, seq_len=10)
    bases = unembedding_bases(adapter)
    heads, mlps = head_and_mlp_fractions(
        adapter, c.lens, bases, c.tokens["eval"], k=adapter.d_model // 4
    )
    for shares in (heads, mlps):
        assert ((shares.output >= 0) & (shares.internal >= 0)).all()
        assert (shares.output + shares.internal <= 1 + 1e-9).all()  # disjoint quarters
    scores = induction_scores(
        adapter, CircuitSettings(k=4, induction_sequences=2, induction_half_len=8), 256
    )
    assert scores.shape == (adapter.n_layers, adapter.n_heads)
    assert ((scores >= 0) & (scores <= 1)).all()


@pytest.fixture(scope="module")
def real_shares(real):
    bases = unembedding_bases(real.adapter)
    k = real.adapter.d_model // 2
    return bases, k, head_and_mlp_fractions(real.adapter, real.lens, bases, real.tokens["eval"], k)


def test_real_share_equals_the_share_of_the_translated_difference(real, real_shares):
    """Independent route: T_{i+1}(h + w) - T_{i+1}(h) on the model's own residual h of layer
    i + 1, in float64, projected on Q; for block i = 12's largest head and the last MLP."""
    bases, k, (heads, mlps) = real_shares
    adapter, block = real.adapter, 12
    head = int(heads.write_norm[block].argmax())
    ids = real.tokens["eval"].long()
    head_w, mlp_w = writes(adapter, ids)
    residual = [real.cache.load(layer, "eval")[:, 1:].double() for layer in (block, block + 1)]
    # the write of block i is what it adds to residual i into residual i + 1
    bias = adapter.attention_out(block).bias
    added = head_w[block].sum(2) + (0 if bias is None else bias) + mlp_w[block]
    step = residual[1] - residual[0]
    assert float((added[:, 1:].double() - step).norm() / step.norm()) < 2e-2  # fp16 cache
    lens = copy.deepcopy(real.lens).double()
    q_out = select(bases[PULLED_BACK].vectors, "output", k).double()
    w = head_w[block][:, 1:, head].double()
    with torch.no_grad():
        delta = translate(lens, residual[1] + w, block + 1) - translate(
            lens, residual[1], block + 1
        )
    expected = (delta @ q_out).pow(2).sum() / delta.pow(2).sum()
    assert float(heads.output[block, head]) == pytest.approx(float(expected), rel=1e-6)
    # the residual-space share of the same write is a different number on the real lens
    residual_share = (w @ q_out).pow(2).sum() / w.pow(2).sum()
    assert abs(float(residual_share - expected)) > 1e-3
    last = adapter.n_layers - 1
    w = mlp_w[last][:, 1:].double()
    expected = (w @ q_out).pow(2).sum() / w.pow(2).sum()  # M = I after the last block
    assert float(mlps.output[last]) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(heads.output + heads.internal, torch.ones_like(heads.output))


def _layered(
    gen: torch.Generator,
    flagged_layers: range,
    effect: float,
    n_layers: int = 10,
    n_heads: int = 9,
    noise: float = 0.02,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values whose layer means rise with depth; two flagged heads in each of ``flagged_layers``
    exceed the other heads of their layer by ``effect``."""
    values = torch.arange(n_layers, dtype=torch.float64)[:, None] * 0.05
    values = values + noise * torch.randn(n_layers, n_heads, generator=gen, dtype=torch.float64)
    flags = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    flags[list(flagged_layers), :2] = True
    return values + effect * flags, flags


def test_stratified_test_finds_the_within_layer_effect_that_pooling_hides():
    gen = torch.Generator().manual_seed(0)
    # induction heads sit in shallow layers (low shares) but beat their own layer by 0.06
    values, flags = _layered(gen, range(0, 4), effect=0.06)
    stratified = layer_permutation_test(values, flags, 2000, 1000, seed=1)
    pooled = layer_permutation_test(values.reshape(1, -1), flags.reshape(1, -1), 2000, 1000, seed=1)
    assert (
        stratified["p_value"] < 0.01 and stratified["effect_lo"] <= 0.06 <= stratified["effect_hi"]
    )
    assert stratified["effect_lo"] > 0
    assert (stratified["n_layers"], stratified["n_compared"], stratified["stratified_by"]) == (
        4,
        8,
        "layer",
    )
    assert pooled["statistic"] < 0 and pooled["p_value"] > 0.5  # pooling layers is misled


def test_stratified_test_is_not_fooled_by_deep_induction_heads():
    gen = torch.Generator().manual_seed(1)
    # induction heads sit in deep layers (high shares) and equal their own layer's heads
    values, flags = _layered(gen, range(6, 10), effect=0.0)
    stratified = layer_permutation_test(values, flags, 2000, 1000, seed=1)
    pooled = layer_permutation_test(values.reshape(1, -1), flags.reshape(1, -1), 2000, 1000, seed=1)
    assert stratified["p_value"] > 0.05 and stratified["effect_lo"] <= 0 <= stratified["effect_hi"]
    assert pooled["p_value"] < 0.01  # pooling layers finds an effect that is not there


def _random_heads(gen: torch.Generator, effect: float, n_layers: int = 12, n_heads: int = 9):
    """Layer means spread widely, 0-2 flagged heads per layer, per-head effects that vary."""
    values = 0.2 * torch.randn(n_layers, 1, generator=gen, dtype=torch.float64)
    values = values + 0.05 * torch.randn(n_layers, n_heads, generator=gen, dtype=torch.float64)
    flags = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer in range(n_layers):
        flagged = int(torch.randint(0, 3, (1,), generator=gen))
        flags[layer, torch.randperm(n_heads, generator=gen)[:flagged]] = True
    spread = 0.02 * torch.randn(n_layers, n_heads, generator=gen, dtype=torch.float64)
    return values + (effect + spread) * flags, flags


def test_p_value_is_calibrated_and_interval_covers_the_effect():
    gen = torch.Generator().manual_seed(2)
    n = 200
    rejected = sum(
        layer_permutation_test(*_random_heads(gen, 0.0), 200, 200, seed=s)["p_value"] <= 0.05
        for s in range(n)
    )
    assert 0.01 <= rejected / n <= 0.10
    effect = 0.03
    covered = 0
    for s in range(n):
        result = layer_permutation_test(*_random_heads(gen, effect), 200, 1000, seed=s)
        covered += result["effect_lo"] <= effect <= result["effect_hi"]
    assert covered / n >= 0.88


def test_no_comparable_layer_gives_no_verdict():
    values = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    flags = torch.zeros(4, 3, dtype=torch.bool)
    flags[1] = True  # a layer of only induction heads has no within-layer comparison
    result = layer_permutation_test(values, flags, 100, 100, seed=0)
    assert result["n_compared"] == 0 and result["n_layers"] == 0 and result["n_induction"] == 3
    assert result["p_value"] != result["p_value"]  # nan


def test_config_refuses_the_retired_depth_bins():
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["h1"]["heads"]["depth_bins"] = 3
    with pytest.raises(Exception, match=r"'depth_bins' was unexpected"):
        validate(config, str(root / "schemas" / "config.schema.yaml"))
