"""Circuit search: the edge graph, patching and EAP-IG against independent computations.

Tiny random models of every family check that the whole graph is the model and the empty circuit
the corrupted run (faithfulness 1 and 0), that patching one edge equals a forward pass with that
term swapped by hand, that EAP's score is the derivative of exact edge patching, and that holding
nodes equals patching their edges. A planted circuit in a tiny GPT-2 is found by the full search
and kept by the cut-down one when its end writes into the output subspace and its beginning reads
the embedding's top directions. The real default model repeats the anchors and the derivative on
IOI prompts, where attention sinks and large residuals live.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import TINY

from lensspace.adapter import Adapter
from lensspace.errors import LensspaceError
from lensspace.experiments import circuit_search as cs
from lensspace.experiments.circuit_tasks import TaskSettings, make_task
from lensspace.models import build_random_model
from lensspace.stats import ratio_interval, resample_counts

FAMILIES = [f for f in sorted(TINY) if f != "opt_350m"]


def corrupted(ids: torch.Tensor, positions: slice, seed: int = 7) -> torch.Tensor:
    out = ids.clone()
    gen = torch.Generator().manual_seed(seed)
    out[:, positions] = torch.randint(3, 250, out[:, positions].shape, generator=gen)
    return out


def logit_difference(ids: torch.Tensor, other: torch.Tensor):
    """A metric: the logit of each prompt's token ``ids`` minus that of ``other`` [B]."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(logits))
        return logits[rows, ids] - logits[rows, other]

    return metric


@pytest.fixture
def graph_setup(tiny, tiny_ids):
    adapter, _ = tiny
    if adapter.norms_after_parts:
        pytest.skip("OPT-350m's norms follow its parts: refused (tested below)")
    runner = cs.GraphRunner(adapter)
    clean, corrupt = tiny_ids, corrupted(tiny_ids, slice(2, 5))
    metric = logit_difference(clean[:, 3], corrupt[:, 3])
    prompts = cs.prompts_of(runner, clean, corrupt, metric)
    with torch.no_grad():
        corrupt_run = runner.run(prompts.corrupt)
    return adapter, runner, prompts, corrupt_run, clean, corrupt


def test_whole_graph_is_the_model_and_the_empty_circuit_the_corrupted_run(graph_setup):
    adapter, runner, prompts, corrupt_run, clean, corrupt = graph_setup
    with torch.no_grad():
        model_clean = prompts.metric(adapter.model(clean).logits[:, -1].float())
        model_corrupt = prompts.metric(adapter.model(corrupt).logits[:, -1].float())
    whole = cs.circuit_metric(runner, prompts, corrupt_run, runner.valid)
    empty = cs.circuit_metric(runner, prompts, corrupt_run, torch.zeros_like(runner.valid))
    torch.testing.assert_close(whole, model_clean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(empty, model_corrupt, atol=1e-4, rtol=1e-4)
    # faithfulness, (circuit - all patched) / (clean - all patched), is 1 and 0
    span = (model_clean - model_corrupt).sum()
    assert float((whole - model_corrupt).sum() / span) == pytest.approx(1.0, abs=1e-4)
    assert float((empty - model_corrupt).sum() / span) == pytest.approx(0.0, abs=1e-4)


def _mlp_writes(adapter: Adapter, ids: torch.Tensor) -> list[torch.Tensor]:
    writes: dict[int, torch.Tensor] = {}
    handles = [
        adapter.mlp(layer).register_forward_hook(
            lambda _m, _a, out, layer=layer: writes.__setitem__(layer, out.reshape(*ids.shape, -1))
        )
        for layer in range(adapter.n_layers)
    ]
    try:
        with torch.no_grad():
            adapter.model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return [writes[i] for i in range(adapter.n_layers)]


def test_patching_one_edge_into_an_mlp_equals_swapping_its_term_by_hand(graph_setup):
    adapter, runner, prompts, corrupt_run, clean, corrupt = graph_setup
    graph = runner.graph
    source, target = 0, adapter.n_layers - 1  # MLP 0 -> MLP L-1's input
    clean_writes, corrupt_writes = _mlp_writes(adapter, clean), _mlp_writes(adapter, corrupt)
    swap = (clean_writes[source] - corrupt_writes[source]).float()

    def hook(_module, args):
        x = args[0]
        return (x - swap.reshape(x.shape).to(x.dtype),)

    handle = adapter.mlp_norm(target).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            expected = prompts.metric(adapter.model(clean).logits[:, -1].float())
    finally:
        handle.remove()
    circuit = runner.valid.clone()
    circuit[graph.mlp(source), graph.layer_inputs(target).stop - 1] = False
    got = cs.circuit_metric(runner, prompts, corrupt_run, circuit)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_patching_the_input_to_logits_edge_swaps_the_embedding_in_the_final_residual(graph_setup):
    adapter, runner, prompts, corrupt_run, clean, corrupt = graph_setup
    store: dict[int, torch.Tensor] = {}
    with torch.no_grad(), adapter.capture_residuals(store):
        adapter.model(clean)
    final = store[adapter.n_layers] - (prompts.clean - prompts.corrupt)
    expected = prompts.metric(adapter.logits(final[:, -1]).float())
    circuit = runner.valid.clone()
    circuit[0, -1] = False
    got = cs.circuit_metric(runner, prompts, corrupt_run, circuit)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def patching_derivative(runner, prompts, clean_run, corrupt_run, u: int, v: int) -> float:
    """d/de of the mean metric with edge ``u -> v``'s term moved a fraction e of the way to its
    corrupted value, by central differences of exact patching (e = 0.01)."""
    eps = 1e-2
    circuit = runner.valid.clone()
    circuit[u, v] = False
    moved = []
    for sign in (1, -1):
        shifted = clean_run.outputs + sign * eps * (corrupt_run.outputs - clean_run.outputs)
        with torch.no_grad():
            trace = runner.run(prompts.clean, corrupt=shifted, circuit=circuit)
        moved.append(prompts.metric(trace.logits).mean())
    return float((moved[0] - moved[1]) / (2 * eps))


def test_eap_scores_are_the_derivative_of_exact_edge_patching(graph_setup):
    """EAP (one step, at the clean input) is d/de of the metric with one edge's term moved a
    fraction e of the way to its corrupted value: central differences of exact patching."""
    adapter, runner, prompts, corrupt_run, _, _ = graph_setup
    counter = cs.FlopCounter(adapter, prompts.clean.shape[1], prompts.clean.shape[0])
    scores = cs.eap_ig(runner, prompts, 1, counter, corrupt_run=corrupt_run)
    torch.testing.assert_close(scores.edges, scores.plain)
    with torch.no_grad():
        clean_run = runner.run(prompts.clean)
    flat = scores.edges.abs().flatten()
    top = torch.argsort(flat, descending=True)[:4].tolist()
    nonzero = (flat > 1e-3 * flat.max()).nonzero().flatten()
    pick = nonzero[torch.randperm(len(nonzero), generator=torch.Generator().manual_seed(0))[:4]]
    for index in top + pick.tolist():
        u, v = divmod(index, runner.graph.n_downstream)
        derivative = patching_derivative(runner, prompts, clean_run, corrupt_run, u, v)
        score = float(scores.edges[u, v])
        assert derivative == pytest.approx(score, rel=3e-2, abs=2e-3 * float(flat.max())), (u, v)


def test_holding_nodes_at_their_corrupted_writes_equals_patching_their_edges(graph_setup):
    adapter, runner, prompts, corrupt_run, _, _ = graph_setup
    if adapter.attention_write_norm(0) is not None:
        pytest.skip(
            "Gemma 2/3: a head's write is divided by the norm of the whole attention output, and "
            "a held head whose key-value group has a kept head reads clean keys and values when "
            "only its edges are patched, so its output, and the norm, differ from the held one"
        )
    kept = cs.random_nodes(runner.graph.n_upstream, 0.5, seed=3)
    with torch.no_grad():
        held = runner.run(prompts.clean, fixed=~kept, held=corrupt_run)
    restricted = runner.graph.restricted(kept)
    patched = cs.circuit_metric(runner, prompts, corrupt_run, restricted)
    torch.testing.assert_close(prompts.metric(held.logits), patched, atol=1e-4, rtol=1e-4)
    # and the restricted search scores no edge outside the restricted graph
    counter = cs.FlopCounter(adapter, prompts.clean.shape[1], prompts.clean.shape[0])
    scores = cs.eap_ig(runner, prompts, 2, counter, kept, corrupt_run)
    assert not bool(scores.edges[~restricted].any())
    assert counter.forward(kept) < counter.forward()


def test_graph_edges_follow_the_residual_stream():
    sequential = cs.Graph(n_layers=2, n_heads=2, n_kv=1, parallel=False)
    valid = sequential.valid()
    # per layer: q of 2 heads + k, v of 1 group + MLP = 5 inputs; the logits read all 7 nodes
    assert valid.shape == (7, 11)
    attention_0 = sequential.layer_inputs(0)
    assert valid[:, attention_0.start : attention_0.stop - 1].sum() == 4  # the input alone
    assert valid[:, attention_0.stop - 1].sum() == 3  # the MLP reads the input and both heads
    parallel = cs.Graph(n_layers=2, n_heads=2, n_kv=1, parallel=True)
    assert parallel.valid()[:, parallel.layer_inputs(0).stop - 1].sum() == 1
    kept = torch.tensor([True, True, False, False, False, False, True])  # input, a0.h0, m1
    restricted = sequential.restricted(kept)
    assert restricted[2].sum() == 0  # a0.h1 writes nowhere
    assert restricted[:, -1].sum() == 3  # input, a0.h0 and m1 to the logits
    # the key and value of group 0 stay: a0.h0, a kept head, reads them
    assert restricted[0, sequential.layer_inputs(0).start + 2]


def test_a_model_whose_norms_follow_its_parts_is_refused():
    model, _ = build_random_model(TINY["opt_350m"])
    with pytest.raises(LensspaceError, match="circuit_tasks"):
        cs.GraphRunner(Adapter(model))


def _plant(model) -> None:
    """A tiny GPT-2 whose every node but head 1 of block 0 and the MLP of block 1 writes 5% of
    its own write; that head reads only the embedding's top directions and that MLP writes only
    along W_U's top directions."""
    adapter = Adapter(model)
    d, k = adapter.d_model, adapter.d_model // 4
    with torch.no_grad():
        _, vectors = torch.linalg.eigh(adapter.embedding_matrix.T @ adapter.embedding_matrix)
        top_in = vectors[:, -k:] @ vectors[:, -k:].T
        _, out_vectors = torch.linalg.eigh(adapter.unembedding.T @ adapter.unembedding)
        top_out = out_vectors[:, -k:] @ out_vectors[:, -k:].T
        head_dim = d // adapter.n_heads
        for layer, block in enumerate(adapter.blocks):
            attn, mlp = block.attn, block.mlp
            for head in range(adapter.n_heads):
                rows = slice(head * head_dim, (head + 1) * head_dim)
                planted = layer == 0 and head == 1
                attn.c_proj.weight[rows] *= 4.0 if planted else 0.05
                if planted:  # c_attn is Conv1D [d, 3d]: this head's q, k and v columns
                    for part in range(3):
                        cols = slice(part * d + rows.start, part * d + rows.stop)
                        attn.c_attn.weight[:, cols] = top_in @ attn.c_attn.weight[:, cols] * 3
            attn.c_proj.bias.zero_()
            if layer == 1:
                mlp.c_proj.weight.copy_(mlp.c_proj.weight @ top_out * 6)
            else:
                mlp.c_proj.weight *= 0.05
            mlp.c_proj.bias.zero_()


def test_a_planted_circuit_is_found_by_the_full_search_and_kept_by_the_cut_down_one():
    model, _ = build_random_model({**TINY["gpt2"], "seed": 21})
    _plant(model)
    adapter = Adapter(model)
    runner = cs.GraphRunner(adapter)
    graph = runner.graph
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 250, (16, 8), generator=gen)
    corrupt = corrupted(clean, slice(0, 8), seed=1)
    with torch.no_grad():
        top = adapter.model(clean).logits[:, -1].argmax(-1)
    prompts = cs.prompts_of(runner, clean, corrupt, logit_difference(top, corrupt[:, -1]))
    planted = {graph.head(0, 1), graph.mlp(1)}
    settings = cs.SearchSettings(ig_steps=3, budgets=(0.05, 0.2, 0.5), random_draws=1)
    full, result = cs.full_search(runner, prompts, settings)
    circuit = cs.top_edges(full, 6)
    nodes = {int(u) for u in circuit.nonzero()[:, 0]} - {0}
    assert nodes <= planted and planted & nodes, (nodes, planted)
    # labels: ends by the output-subspace share of each node's write, beginnings by read shares
    k = adapter.d_model // 4
    with torch.no_grad():
        writes = runner.run(prompts.clean).outputs.flatten(1, 2)  # [U, B * T, d]
    _, vectors = torch.linalg.eigh(adapter.unembedding.T @ adapter.unembedding)
    out = vectors[:, -k:]
    ends = (writes @ out).square().sum((1, 2)) / writes.square().sum((1, 2))
    labels = cs.label_scores(ends.double(), cs.read_shares(adapter, k))
    kept = cs.top_nodes(labels, 0.2)
    assert planted <= {int(i) for i in kept.nonzero()}
    cut = cs.restricted_searches(runner, prompts, settings, 0.2, labels, full)
    metrics = pd.DataFrame(result.metrics + cut.metrics)
    at = metrics[metrics.budget == 0.05].groupby("method")["metric"].mean()
    with torch.no_grad():
        corrupt_metric = prompts.metric(runner.run(prompts.corrupt).logits).mean()
    gain = {m: float(at[m] - corrupt_metric) for m in at.index}
    assert gain["labels"] > 0.9 * gain["full"], gain


def test_area_weights_are_a_mean_over_log_budget():
    weights = cs.auc_weights([0.001, 0.01, 0.1])
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    assert float(cs.auc_weights([0.5]).sum()) == 1.0


def _frames(n: int, gen: torch.Generator):
    clean = 2 + torch.rand(n, generator=gen)
    corrupt = torch.zeros(n)
    prompts = pd.DataFrame({"clean_metric": clean.numpy(), "patched_metric": corrupt.numpy()})
    rows, costs = [], []
    for method, fraction, share in (("full", 1.0, 0.9), ("labels", 0.5, 0.6), ("random", 0.5, 0.2)):
        for budget in (0.01, 0.1):
            scale = share if budget == 0.01 else min(1.0, share + 0.1)
            for i in range(n):
                rows += cs._metric_rows(method, fraction, 0, budget, 10, torch.tensor([0.0]))
                rows[-1]["prompt"], rows[-1]["metric"] = i, float(scale * clean[i])
        costs.append(
            {
                "method": method,
                "fraction": fraction,
                "flops": 4.0 * share,
                "seconds": 1.0,
                "kept_mlps": 3,
            }
        )
    recall = pd.DataFrame(
        [{"method": "labels", "fraction": 0.5, "budget": b, "recall": 0.5} for b in (0.01, 0.1)]
        + [{"method": "random", "fraction": 0.5, "budget": b, "recall": 0.1} for b in (0.01, 0.1)]
    )
    return prompts, pd.DataFrame(rows), pd.DataFrame(costs), recall


def test_summary_of_constructed_curves():
    prompts, metrics, costs, recall = _frames(12, torch.Generator().manual_seed(0))
    per_budget, per_search = cs.summarise(prompts, metrics, costs, recall, 200, 0)
    search = per_search.set_index("method")
    assert search.loc["full", "relative_auc"] == pytest.approx(1.0)
    assert search.loc["full", "auc"] == pytest.approx(0.95)
    assert search.loc["labels", "relative_auc"] == pytest.approx(0.65 / 0.95)
    assert search.loc["labels", "vs_random"] == pytest.approx(0.65 - 0.25)
    assert search.loc["labels", "compute"] == pytest.approx(0.6 / 0.9)
    assert search.loc["labels", "recall"] == pytest.approx(0.5)
    assert not search["goal_met"].any()
    row = per_budget[(per_budget.method == "labels") & (per_budget.budget == 0.01)].iloc[0]
    assert row["faithfulness"] == pytest.approx(0.6)
    # every prompt keeps the same share: the interval has no width
    assert row["faithfulness_lo"] == pytest.approx(0.6) == row["faithfulness_hi"]


def test_relative_faithfulness_interval_covers_at_the_prompt_count_used():
    """The paired ratio of two searches' summed numerators over 32 prompts, whose per-prompt
    values are noisy and correlated: the bootstrap-t interval's coverage by simulation."""
    gen = torch.Generator().manual_seed(0)
    n, trials, hits = 32, 400, 0
    counts = resample_counts(n, 500, 1)
    for _ in range(trials):
        full = 1.0 + torch.distributions.Gamma(2.0, 2.0).sample((n,))
        cut = 0.7 * full + 0.5 * torch.randn(n, generator=gen)
        lo, hi = ratio_interval(cut, full, counts)
        hits += lo <= 0.7 <= hi
    assert 0.90 <= hits / trials <= 0.98, hits / trials


def test_real_model_anchors_and_eap_on_ioi(real):
    adapter, tokenizer = real.adapter, real.tokenizer
    task = make_task("ioi", tokenizer, adapter.unembedding.shape[0], TaskSettings(n_prompts=4))
    runner = cs.GraphRunner(adapter)
    prompts = cs.prompts_of(runner, task.clean, task.corrupt, task.metric)
    with torch.no_grad():
        corrupt_run = runner.run(prompts.corrupt)
        model_clean = task.metric(adapter.model(task.clean).logits[:, -1].float())
        model_corrupt = task.metric(adapter.model(task.corrupt).logits[:, -1].float())
    whole = cs.circuit_metric(runner, prompts, corrupt_run, runner.valid)
    empty = cs.circuit_metric(runner, prompts, corrupt_run, torch.zeros_like(runner.valid))
    torch.testing.assert_close(whole, model_clean, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(empty, model_corrupt, atol=2e-3, rtol=1e-3)
    counter = cs.FlopCounter(adapter, prompts.clean.shape[1], prompts.clean.shape[0])
    scores = cs.eap_ig(runner, prompts, 1, counter, corrupt_run=corrupt_run)
    with torch.no_grad():
        clean_run = runner.run(prompts.clean)
    flat = scores.edges.abs().flatten()
    for index in torch.argsort(flat, descending=True)[:3].tolist():
        u, v = divmod(index, runner.graph.n_downstream)
        derivative = patching_derivative(runner, prompts, clean_run, corrupt_run, u, v)
        assert derivative == pytest.approx(float(scores.edges[u, v]), rel=5e-2), (u, v)
    assert math.isfinite(float(flat.sum()))


def test_workflow_writes_every_search_of_each_task(tiny_run):
    workdir, config = tiny_run
    settings = config["circuit_search"]
    tasks = config["runs"]["tiny-llama"]["circuit_tasks"]
    folder = workdir / "results" / "tiny-llama" / "circuits"
    labels = pd.read_csv(folder / "labels.tsv", sep="\t")
    assert labels["score"].between(0, 1).all() and labels["beginning"].between(0, 1).all()
    for task in tasks:
        prompts = pd.read_csv(folder / task / "prompts.tsv", sep="\t")
        assert len(prompts) == settings["n_prompts"]
        assert {"clean_correct", "clean_top1", "corrupt_correct"} <= set(prompts.columns)
        costs = pd.concat(
            [pd.read_csv(p, sep="\t") for p in sorted((folder / task).glob("*/costs.tsv"))]
        )
        full = costs[costs.method == "full"].iloc[0]
        restricted = costs[~costs.method.isin(["full", "node_attribution"])]
        assert (restricted["edges_searched"] < full["edges_searched"]).all()
        assert (restricted["restricted_backward"] == settings["ig_steps"]).all()
        assert full["full_backward"] == settings["ig_steps"]
        metrics = pd.read_csv(folder / task / "full" / "metrics.tsv", sep="\t")
        assert len(metrics) == settings["n_prompts"] * len(settings["budgets"])
        summary = pd.read_csv(folder / task / "summary.tsv", sep="\t").set_index("method")
        assert summary.loc["full", "relative_auc"] == pytest.approx(1.0)
        assert summary.loc["full", "compute"] == pytest.approx(1.0)
        assert set(summary.index) == {"full", "labels", "attribution", "random"}
        assert summary["recall"].between(0, 1).all()
        # a search restricted to half the nodes computes less than the full one
        assert (summary.loc[["labels", "random"], "compute"] < 1).all()
    table = workdir / "results" / "tables" / "circuit_search_tiny-llama.md"
    assert "relative AUC" in table.read_text()
    assert (workdir / "results" / "figures" / "circuit_search_tiny-llama.png").stat().st_size > 0


def test_a_fresh_runners_first_pass_records_each_layer_once(tiny, tiny_ids):
    """The block runner records the blocks' arguments with one pass of its own on a new shape:
    that pass must not reach the graph's hooks (one leaf per input, one entry per layer)."""
    adapter, _ = tiny
    if adapter.norms_after_parts:
        pytest.skip("refused")
    runner = cs.GraphRunner(adapter)
    trace = runner.run(runner.embed(tiny_ids), leaves=True)
    trace.logits.sum().backward()
    assert trace.gradients().shape[2] == runner.graph.n_downstream
    assert len(trace.head_inputs) == adapter.n_layers
