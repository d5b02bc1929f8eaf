"""Per-node lenses: each operation against an independent computation.

Tiny random models of every family check the ablation (the exact total effect equals a full
forward pass with the node's write replaced by hand), the last MLP (its total effect is its direct
effect, so every method agrees), the Jacobian (against reverse mode), a planted node read only by
a later node (no direct logit effect, a high lens score) and a linear toy model (the lens
recovers its map). The real default model checks the ablation and the Jacobian where an
attention sink and large residuals live.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import TINY, model_head

from lensspace.adapter import Adapter
from lensspace.experiments import nodes as nd
from lensspace.models import build_random_model
from lensspace.runner import BlockRunner

# families whose attention write is its output projection alone (no norm after it): a head's
# write is then replaced by replacing its slice of the projection's input
NO_WRITE_NORM = [f for f in sorted(TINY) if f not in ("gemma2", "gemma3_text")]


def residual_at(adapter: Adapter, ids: torch.Tensor, layer: int) -> torch.Tensor:
    store: dict[int, torch.Tensor] = {}
    with torch.no_grad(), adapter.capture_residuals(store):
        adapter.model(ids, use_cache=False)
    return store[layer], store[adapter.n_layers]


def final_with_hook(adapter: Adapter, ids: torch.Tensor, module, hook, pre: bool):
    """The final residual of a full forward pass with one hook on ``module``."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        return residual_at(adapter, ids, 0)[1]
    finally:
        handle.remove()


@pytest.fixture
def setup(tiny, tiny_ids):
    adapter, _ = tiny
    runner = BlockRunner(adapter)
    train = torch.randint(0, 256, (6, 12), generator=torch.Generator().manual_seed(1))
    return adapter, runner, train, tiny_ids


def block_inputs(adapter, ids, layer):
    return residual_at(adapter, ids, layer)[0]


@pytest.mark.parametrize("layer", [0, 1])
def test_total_effect_of_an_mlp_is_a_full_forward_with_its_write_replaced(setup, layer):
    adapter, runner, train, ids = setup
    means = nd.block_means(runner, layer, block_inputs(adapter, train, layer), chunk=4)
    node = nd.Node(layer)
    got = nd.total_effects(runner, layer, block_inputs(adapter, ids, layer), [node], means, 2)

    def replace(_module, _args, out):  # the MLP's output at positions 1.. set to the mean
        shaped = out.reshape(*ids.shape, -1).clone()
        shaped[:, 1:] = means.mlp
        return shaped.reshape(out.shape)

    ablated = final_with_hook(adapter, ids, adapter.mlp(layer), replace, pre=False)
    clean = residual_at(adapter, ids, 0)[1]
    want = (ablated - clean)[:, 1:]
    scale = float(want.abs().max()) + 1e-6
    assert float((got.effects[node] - want).abs().max()) < 1e-4 * max(1.0, scale)
    assert float(want.abs().max()) > 1e-4  # the ablation changes something


@pytest.mark.parametrize("family", NO_WRITE_NORM)
def test_total_effect_of_a_head_is_a_full_forward_with_its_input_slice_replaced(family):
    model, _ = build_random_model(TINY[family])
    adapter = Adapter(model.requires_grad_(False))
    runner = BlockRunner(adapter)
    gen = torch.Generator().manual_seed(2)
    train, ids = torch.randint(0, 256, (6, 12), generator=gen), torch.randint(0, 256, (3, 12))
    layer, head = 1, 2
    means = nd.block_means(runner, layer, block_inputs(adapter, train, layer), chunk=4)
    node = nd.Node(layer, head)
    got = nd.total_effects(runner, layer, block_inputs(adapter, ids, layer), [node], means, 2)
    e = adapter.head_out_weights(layer).shape[1]

    def replace(_module, args):  # the head's slice of W_O's input at positions 1.. set to the mean
        x = args[0].clone()
        x[:, 1:, head * e : (head + 1) * e] = means.heads[head]
        return (x,)

    ablated = final_with_hook(adapter, ids, adapter.attention_out(layer), replace, pre=True)
    want = (ablated - residual_at(adapter, ids, 0)[1])[:, 1:]
    assert float((got.effects[node] - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
    assert float(want.abs().max()) > 1e-4


def test_nodes_ablated_in_one_pass_equal_each_alone(setup):
    """Several nodes share a pass, each on its own copy of the sequences: the same effects as
    one pass per node."""
    adapter, runner, train, ids = setup
    layer = 1
    means = nd.block_means(runner, layer, block_inputs(adapter, train, layer), chunk=4)
    h = block_inputs(adapter, ids, layer)
    nodes = nd.block_nodes(adapter, layer)
    together = nd.total_effects(runner, layer, h, nodes, means, chunk=4)
    for node in nodes:
        alone = nd.total_effects(runner, layer, h, [node], means, chunk=4)
        scale = float(alone.effects[node].abs().max()) + 1e-6
        assert float((together.effects[node] - alone.effects[node]).abs().max()) < 1e-4 * scale


def test_head_writes_sum_to_the_attention_write(setup):
    """The probe's per-head writes add up to what the attention adds to the residual (the
    projection's bias aside), so replacing one of them is replacing that head's write."""
    adapter, runner, _, ids = setup
    layer = 1
    h = block_inputs(adapter, ids, layer)
    probe = nd.BlockProbe(adapter, layer)
    seen = {}
    module = nd._attention_write_module(adapter, layer)
    handle = module.register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("w", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with probe.attach(h.shape[:2]):
            runner.call_block(layer, h)
    finally:
        handle.remove()
    bias = getattr(adapter.attention_out(layer), "bias", None)
    summed = probe.head_writes().sum(2) + (0 if bias is None else bias)
    if adapter.attention_write_norm(layer) is None:
        assert torch.allclose(summed, seen["w"], atol=1e-4, rtol=1e-4)
    else:  # a norm after the attention: the scaled heads' writes are its output
        assert torch.allclose(summed, seen["w"], atol=1e-3, rtol=1e-3)


def last_mlp_rows(adapter, runner, train, ids):
    layer = adapter.n_layers - 1
    node = nd.Node(layer)
    means = nd.block_means(runner, layer, block_inputs(adapter, train, layer), chunk=4)
    fit = nd.total_effects(runner, layer, block_inputs(adapter, train, layer), [node], means, 4)
    ev = nd.total_effects(runner, layer, block_inputs(adapter, ids, layer), [node], means, 4)
    lens = nd.fit_node_lens(
        nd._flat(fit.writes[node][:4]),
        nd._flat(fit.effects[node][:4]),
        nd._flat(fit.writes[node][4:]),
        nd._flat(fit.effects[node][4:]),
        (1e-6,),
    )
    dw = means.write(nd.BlockProbe(adapter, layer), node) - ev.writes[node]
    d = adapter.d_model
    jac = nd.write_jacobian(runner, layer, block_inputs(adapter, train, layer)[:2], "mlp", 1e-3)
    preds = nd.predictions(adapter, node, dw, ev.writes[node], torch.eye(d), jac, lens)
    q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0]
    rows = nd.node_rows(
        adapter,
        node,
        ev.clean,
        ev.effects[node],
        preds,
        q[:, :4].double(),
        q[:, 4:8].double(),
        chunk=2,
        kl_stride=2,
    )
    return node, ev, dw, jac, preds, pd.DataFrame(rows)


def test_the_last_mlps_total_effect_is_its_direct_effect_and_every_method_agrees(setup):
    adapter, runner, train, ids = setup
    if adapter.model_type == "opt" and adapter.norm_kind == "none":
        pytest.skip("OPT-350m normalises after the MLP: its write is not the residual's change")
    node, ev, dw, jac, preds, rows = last_mlp_rows(adapter, runner, train, ids)
    dz = ev.effects[node]
    assert torch.allclose(dz, dw, atol=1e-4 * float(dw.abs().max()))
    assert torch.allclose(jac, torch.eye(adapter.d_model, dtype=torch.float64), atol=1e-2)
    totals = rows.groupby("method")[["sse", "sst", "kl", "kl_tokens"]].sum()
    r2 = 1 - totals["sse"] / totals["sst"]
    for method in ("dla", "layer_lens", "jacobian", "node_lens"):
        assert r2[method] > 1 - 1e-3, method
    for method in ("layer_lens", "jacobian", "node_lens"):  # through the norm, like the model
        assert totals.loc[method, "kl"] / totals.loc[method, "kl_tokens"] < 1e-4, method
    # direct attribution freezes the norm's scale: its KL is that of the model's own head fed the
    # clean normalised residual plus the change divided by the clean scale
    z = ev.clean.double()
    centred = z - z.mean(-1, keepdim=True) if adapter.norm_kind == "layernorm" else z
    scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + adapter.norm_eps)
    change = dz.double() - dz.double().mean(-1, keepdim=True) * (adapter.norm_kind == "layernorm")
    frozen = adapter.norm_affine(((centred + change) / scale).float())
    p = model_head(adapter, (z + dz.double()).float()).double().log_softmax(-1)
    q = model_head(adapter, frozen, after_norm=True).double().log_softmax(-1)
    want = float((p.exp() * (p - q)).sum(-1)[:, ::2].mean())
    got = totals.loc["dla", "kl"] / totals.loc["dla", "kl_tokens"]
    assert abs(got - want) < 1e-3 * max(1.0, want) + 1e-5


def same_position_jacobian(adapter, runner, layer, h, site, dims=None) -> torch.Tensor:
    """``E_t[dz_t / dw_t]`` by reverse mode, one output coordinate and position at a time."""
    n, length, d = h.shape
    dims = range(d) if dims is None else dims
    out = torch.zeros(d, d, dtype=torch.float64)
    delta = torch.zeros(n, length, d, requires_grad=True)
    edit = {f"{site}_edit": lambda _p: delta}
    with torch.enable_grad(), nd.BlockProbe(adapter, layer).attach(h.shape[:2], **edit):
        z = runner.run.__wrapped__(runner, h, start=layer)
    for t in range(1, length):
        for i in dims:
            (grad,) = torch.autograd.grad(z[:, t, i].sum(), delta, retain_graph=True)
            out[i] += grad[:, t].sum(0).double()
    return out / (n * (length - 1))


def test_same_position_jacobian_matches_reverse_mode(setup):
    """The random-sign forward differences converge to the same-position Jacobian (64 patterns
    here; the workflow's one pattern is the same estimate with more noise)."""
    adapter, runner, train, _ = setup
    layer = 1
    h = block_inputs(adapter, train, layer)[:2]
    runner.run(h, start=layer)  # the block arguments of this shape, recorded outside any hook
    for site in ("attention", "mlp"):
        got = nd.write_jacobian(runner, layer, h, site, step=1e-3, patterns=64)
        want = same_position_jacobian(adapter, runner, layer, h, site)
        err = float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want))
        assert err < 5e-2, (site, err)


def test_node_lens_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    d, n = 8, 400
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    w = torch.randn(n, d, generator=gen, dtype=torch.float64)
    dz = w @ a + b
    lens = nd.fit_node_lens(w[:300], dz[:300], w[300:], dz[300:], (1e-8, 1e-2, 1.0))
    assert lens.ridge == 1e-8
    assert torch.allclose(lens.weight, a, atol=1e-5)
    assert torch.allclose(lens(w).double(), dz, atol=1e-4)


def test_the_ridge_is_chosen_on_held_out_tokens():
    """With few noisy samples, a larger ridge predicts the check tokens better."""
    gen = torch.Generator().manual_seed(1)
    d = 20
    a = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.1
    w = torch.randn(60, d, generator=gen, dtype=torch.float64)
    dz = w @ a + torch.randn(60, d, generator=gen, dtype=torch.float64)
    lens = nd.fit_node_lens(w[:25], dz[:25], w[25:], dz[25:], (1e-6, 1.0, 100.0))
    assert lens.ridge > 1e-6
    assert lens.check_r2[lens.ridge] == max(lens.check_r2.values())


def planted(seed: int = 0):
    """A 2-block GPT-2 whose head 0 of block 0 writes only along ``u``, a direction the
    unembedding ignores, and whose block-1 MLP reads ``u`` (in its linear regime) and writes along
    a direction the unembedding reads: the head acts on the output only through that MLP. Block
    0's MLP and block 1's attention are silenced, and a large constant along ``v`` keeps the norms'
    scales nearly constant, so the path is close to affine."""
    spec = {"arch": "gpt2", "n_layers": 2, "d_model": 32, "n_heads": 4, "seed": seed}
    model, _ = build_random_model(spec)
    adapter = Adapter(model.requires_grad_(False))
    d, e = 32, 8
    gen = torch.Generator().manual_seed(seed)

    def unit_zero_mean(x):  # LayerNorm centres: a zero-mean direction passes it unchanged
        x = x - x.mean()
        return x / x.norm()

    u = unit_zero_mean(torch.randn(d, generator=gen))
    v = torch.randn(d, generator=gen)
    v = unit_zero_mean(v - v.dot(u) * u)
    v = v - v.dot(u) * u
    with torch.no_grad():
        g = adapter.norm_gain
        gu = g * u
        w_u = adapter.output_embedding.weight  # tied with the embedding: both lose gu
        w_u -= torch.outer(w_u @ gu, gu) / gu.dot(gu)
        attn = adapter.attention_out(0)  # Conv1D [in, out]
        attn.weight[:e] = torch.randn(e, 1, generator=gen) * 0.3 * u
        attn.bias.copy_(10.0 * v)
        first, second = model.transformer.h
        first.mlp.c_proj.weight.zero_()
        first.mlp.c_proj.bias.zero_()
        second.attn.c_proj.weight.zero_()
        second.attn.c_proj.bias.zero_()
        mlp = second.mlp
        mlp.c_fc.weight.zero_()
        mlp.c_fc.bias.fill_(-50.0)  # silent units
        mlp.c_fc.weight[:, :8] = u[:, None] * 20.0
        mlp.c_fc.bias[:8] = 50.0  # GELU far in its linear regime
        read = w_u[5] / g
        read = read - read.mean()
        read = read - read.dot(u) * u
        read = read / read.norm()
        mlp.c_proj.weight.zero_()
        mlp.c_proj.weight[:8] = read
        mlp.c_proj.bias.copy_(-50.0 * 8 * read)  # the units' constant part cancelled
    return adapter


def test_a_node_read_only_by_a_later_node_has_no_direct_effect_and_a_high_lens_score():
    adapter = planted()
    runner = BlockRunner(adapter)
    gen = torch.Generator().manual_seed(3)
    train = torch.randint(0, 256, (24, 16), generator=gen)
    held = torch.randint(0, 256, (6, 16), generator=gen)
    node = nd.Node(0, 0)
    means = nd.block_means(runner, 0, block_inputs(adapter, train, 0), chunk=8)
    fit = nd.total_effects(runner, 0, block_inputs(adapter, train, 0), [node], means, 8)
    ev = nd.total_effects(runner, 0, block_inputs(adapter, held, 0), [node], means, 8)
    lens = nd.fit_node_lens(
        nd._flat(fit.writes[node][:18]),
        nd._flat(fit.effects[node][:18]),
        nd._flat(fit.writes[node][18:]),
        nd._flat(fit.effects[node][18:]),
        (1e-4, 1e-2, 1.0),
    )
    dw = means.write(nd.BlockProbe(adapter, 0), node) - ev.writes[node]
    d = adapter.d_model
    jac = torch.eye(d, dtype=torch.float64)
    preds = nd.predictions(adapter, node, dw, ev.writes[node], torch.eye(d), jac, lens)
    # direct attribution: the write's logit effect through the frozen scale is nothing
    direct = nd.method_logits(adapter, "dla", ev.clean, preds["dla"])
    assert float((direct - adapter.logits(ev.clean)).abs().max()) < 1e-3
    q = torch.linalg.qr(torch.randn(d, d, generator=gen))[0].double()
    rows = pd.DataFrame(
        nd.node_rows(
            adapter,
            node,
            ev.clean,
            ev.effects[node],
            preds,
            q[:, :4],
            q[:, 4:8],
            chunk=3,
        )
    )
    totals = rows.groupby("method")[["sse", "sst", "kl", "kl_tokens"]].sum()
    r2 = 1 - totals["sse"] / totals["sst"]
    assert r2["node_lens"] > 0.95
    assert r2["dla"] < 0.2
    kl = totals["kl"] / totals["kl_tokens"]
    assert kl["none"] > 0.1  # the head does change the output, through the MLP
    assert abs(kl["dla"] - kl["none"]) < 1e-3 * kl["none"]
    assert kl["node_lens"] < 0.1 * kl["dla"]


# --------------------------------------------------------------------------- statistics


def sums_frame(gen, n_nodes=4, n_seq=8, shift=0.0):
    rows = []
    for i in range(n_nodes):
        size = 1.0 + i
        for s in range(n_seq):
            sst = float(10 + torch.rand(1, generator=gen)) * size
            for method in ("measured", *nd.METHODS):
                sse = 0.0 if method == "measured" else sst * float(torch.rand(1, generator=gen))
                if method == "node_lens":
                    sse = sse * 0.5 - shift
                energy = 0.0 if method == "none" else size * float(1 + torch.rand(1, generator=gen))
                rows.append(
                    {
                        "layer": 0,
                        "node": f"n{i}",
                        "kind": "head",
                        "head": i,
                        "method": method,
                        "sequence": s,
                        "n_tokens": 10,
                        "kl_tokens": 5,
                        "sst": sst,
                        "sse": sse,
                        "sse_centred": 0.9 * sse,
                        "kl": float(torch.rand(1, generator=gen)),
                        "energy": energy,
                        "out_energy": energy * 0.3,
                        "int_energy": energy * 0.2,
                    }
                )
    return pd.DataFrame(rows)


def test_scores_are_ratios_of_sums_with_intervals_around_them():
    sums = sums_frame(torch.Generator().manual_seed(0))
    scores = nd.score_rows(sums, n_boot=200, seed=0)
    row = scores[(scores["node"] == "n1") & (scores["method"] == "dla")].iloc[0]
    part = sums[(sums["node"] == "n1") & (sums["method"] == "dla")]
    assert row["r2"] == pytest.approx(1 - part["sse"].sum() / part["sst"].sum())
    assert row["r2_lo"] <= row["r2"] <= row["r2_hi"]
    assert row["kl"] == pytest.approx(part["kl"].sum() / part["kl_tokens"].sum())
    assert row["output_share"] == pytest.approx(0.3)


def test_comparison_direction_follows_the_sequences():
    """A lens with half the error is better; the same table with the roles swapped is worse."""
    sums = sums_frame(torch.Generator().manual_seed(0))
    table = nd.comparison_rows(sums, n_boot=200, seed=0)
    assert (table["r2_gain"] > 0).all()
    swapped = sums.copy()
    lens = swapped["method"] == "node_lens"
    dla = swapped["method"] == "dla"
    swapped.loc[lens, "method"], swapped.loc[dla, "method"] = "dla", "node_lens"
    other = nd.comparison_rows(swapped, n_boot=200, seed=0)
    mine = table[table["baseline"] == "dla"].set_index("node")["r2_gain"]
    theirs = other[other["baseline"] == "dla"].set_index("node")["r2_gain"]
    assert torch.allclose(torch.tensor(mine.values), -torch.tensor(theirs.values))
    assert (table["p_adjusted"] >= table["p_value"]).all()


def test_a_negligible_gain_is_no_verdict_however_consistent():
    """Every sequence slightly worse (a ridge's shrinkage of an exact fit) is not "baseline
    better": the gain must reach the margin, and an interval inside it is "equivalent"."""
    sums = sums_frame(torch.Generator().manual_seed(0), n_seq=16)
    lens = sums["method"] == "node_lens"
    for baseline in nd.BASELINES:
        rows = sums["method"] == baseline
        sums.loc[rows, "sse"] = sums.loc[lens, "sse"].to_numpy() - 1e-6
    table = nd.comparison_rows(sums, n_boot=200, seed=0, margin=0.01)
    assert (table["n_worse"] == 16).all() and (table["p_adjusted"] < 0.05).all()
    assert (table["verdict"] == "equivalent").all()


def test_spearman_matches_a_direct_rank_correlation():
    a = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0])
    b = torch.tensor([30.0, 20.0, 10.0, 50.0, 40.0])
    ra, rb = torch.tensor([2.0, 0, 1, 4, 3]), torch.tensor([2.0, 1, 0, 4, 3])
    want = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert float(nd.spearman(a, b)) == pytest.approx(want)
    assert float(nd.spearman(a, a)) == pytest.approx(1.0)


@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_r2_interval_covers_at_the_sample_size_used(sigma):
    """Coverage of the R² interval at 16 sequences (the default's), from skewed per-sequence
    totals: lognormal ``sst``, gamma noise on ``sse`` (the true R² is known)."""
    torch.manual_seed(0)
    n_seq, trials, hits = 16, 600, 0
    true = 0.6
    counts = nd.resample_counts(n_seq, 500, 1)
    for _ in range(trials):
        sst = torch.distributions.LogNormal(0.0, sigma).sample((n_seq,)).double()
        noise = torch.distributions.Gamma(2.0, 5.0).sample((n_seq,)).double()
        sse = (1 - true) * sst * noise / 0.4
        lo, hi = nd.r2_interval(sse, sst, counts)
        hits += lo <= true <= hi
    assert 0.89 <= hits / trials <= 0.98


# --------------------------------------------------------------------------- refusals


def validated(edit) -> dict:
    import yaml
    from conftest import ROOT

    from lensspace.configfile import validate_config

    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    edit(config)
    validate_config(config, str(ROOT / "schemas" / "config.schema.yaml"))
    return config


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["nodes"].update(layers=[5]), r"nodes.layers: block 5 does not exist"),
        (
            lambda c: c["nodes"].update(fit_sequences=30),
            r"nodes.fit_sequences \+ nodes.ridge_sequences: 34 is more than run",
        ),
        (lambda c: c["nodes"].update(eval_sequences=9), r"nodes.eval_sequences: 9 is more"),
        (lambda c: c["nodes"].update(jacobian_positions=40), r"raise data.seq_len"),
    ],
)
def test_refusals_name_the_key(edit, message):
    from lensspace.errors import LensspaceError
    from lensspace.validation import check_references

    with pytest.raises(LensspaceError, match=message):
        check_references(validated(edit))


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_block(real):
    adapter = real.adapter
    runner = BlockRunner(adapter)
    layer = adapter.n_layers - 3
    means = nd.block_means(runner, layer, real.cache.load(layer, "train"), chunk=4)
    return adapter, runner, layer, means


def test_real_total_effect_is_a_full_forward_with_the_head_replaced(real, real_block):
    """On SmolLM2 (an attention sink at position 0, residuals in the hundreds): resuming from the
    block's input gives the full forward pass's counterfactual."""
    adapter, runner, layer, means = real_block
    ids = real.tokens["eval"][:2].long()
    head = 3
    node = nd.Node(layer, head)
    h = block_inputs(adapter, ids, layer)
    got = nd.total_effects(runner, layer, h, [node], means, 2)
    e = adapter.head_out_weights(layer).shape[1]

    def replace(_module, args):
        x = args[0].clone()
        x[:, 1:, head * e : (head + 1) * e] = means.heads[head]
        return (x,)

    ablated = final_with_hook(adapter, ids, adapter.attention_out(layer), replace, pre=True)
    want = (ablated - residual_at(adapter, ids, 0)[1])[:, 1:]
    err = float((got.effects[node] - want).norm() / want.norm())
    assert err < 1e-3, err


def test_real_jacobian_matches_reverse_mode_on_a_few_directions(real, real_block):
    adapter, runner, layer, _ = real_block
    h = real.cache.load(layer, "train")[:1, :24]
    runner.run(h, start=layer)
    got = nd.write_jacobian(runner, layer, h, "mlp", step=1e-3, patterns=8)
    dims = torch.randint(0, adapter.d_model, (3,), generator=torch.Generator().manual_seed(0))
    want = same_position_jacobian(adapter, runner, layer, h, "mlp", dims.tolist())
    for i in dims.tolist():
        err = float((got[i] - want[i]).norm() / want[i].norm())
        assert err < 5e-2, (i, err)


# --------------------------------------------------------------------------- the workflow


def test_workflow_nodes_tsvs(tiny_run):
    workdir, config = tiny_run
    for run in config["runs"]:
        folder = workdir / "results" / run / "nodes"
        scores = pd.read_csv(folder / "scores.tsv", sep="\t")
        comparisons = pd.read_csv(folder / "comparisons.tsv", sep="\t")
        ranks = pd.read_csv(folder / "ranks.tsv", sep="\t")
        induction = pd.read_csv(folder / "induction.tsv", sep="\t")
        fits = pd.read_csv(folder / "fits.tsv", sep="\t")
        n_layers = config["models"][config["runs"][run]["model"]]["n_layers"]
        assert set(scores["layer"]) == set(range(n_layers))  # nodes.layers null: H0's (all)
        assert set(scores["method"]) == {"measured", *nd.METHODS}
        assert len(fits) == scores["node"].nunique() == len(comparisons) // len(nd.BASELINES)
        measured = scores[scores["method"] == "measured"]
        assert (measured["r2"] == 1).all()
        assert (scores["r2"] <= 1 + 1e-9).all() and (scores["kl"] >= -1e-6).all()
        assert ((scores["r2_lo"] <= scores["r2"] + 1e-9) | scores["r2_lo"].isna()).all()
        assert (scores["output_share"].dropna().between(0, 1 + 1e-9)).all()
        # the last MLP's total effect is its write: every predictor explains it
        last = scores[
            (scores["node"] == f"L{n_layers - 1}.mlp")
            & scores["method"].isin(nd.BASELINES + ("node_lens",))
        ]
        if config["models"][config["runs"][run]["model"]]["arch"] != "opt":
            assert (last["r2"] > 1 - 1e-3).all(), run
        assert set(comparisons["verdict"]) <= {
            "node lens better",
            "baseline better",
            "equivalent",
            "not separable",
        }
        assert (comparisons["p_adjusted"] >= comparisons["p_value"] - 1e-12).all()
        assert ranks["spearman"].between(-1, 1).all() and len(ranks) == 4
        assert list(induction["share"]) == list(nd.SHARE_SOURCES)
        assert set(fits["ridge"]) <= set(config["nodes"].get("ridges", nd.NodeSettings.ridges))
        assert (workdir / "results" / "tables" / f"nodes_{run}.md").exists()
        assert (workdir / "results" / "figures" / f"nodes_{run}.png").stat().st_size > 0
    page = (workdir / "results" / "report" / "index.html").read_text()
    assert "data-section='nodes'" in page
