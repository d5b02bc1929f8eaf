"""Circuit search over a model's edges, in full and cut down to candidate circuit ends and
beginnings.

The graph: upstream nodes are the input embedding, every attention head and every MLP;
downstream inputs are every head's query input, every key-value head's key and value inputs,
every MLP's input and the logits. Every input reads the residual stream, which is the sum of the
writes of the nodes before it (plus biases that no prompt changes), so an edge ``u -> v`` is
``u``'s term in ``v``'s input. Patching an edge replaces that term, in ``v``'s input alone, with
its value on the corrupted prompt; a circuit is evaluated with every edge outside it patched.

Edges are scored by edge attribution patching with integrated gradients (EAP-IG, Hanna et al.
2024): ``(a_u(corrupt) - a_u(clean)) . dm/dx_v``, summed over positions and averaged over prompts,
the gradient averaged over inputs interpolated between the corrupted and the clean embedding
(``steps = 1`` is plain EAP at the clean input). A search restricted to a set of nodes holds every
other node at its value on the corrupted prompt, which a runner that skips them never computes:
its cost is counted in FLOPs of the nodes it keeps (:class:`FlopCounter`); held MLPs are skipped
here, held heads still run inside their attention.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm import tqdm

from lensspace.adapter import Adapter
from lensspace.errors import LensspaceError
from lensspace.experiments.circuit_tasks import Task, TaskSettings, make_task
from lensspace.runner import BlockRunner
from lensspace.stats import ratio_interval, resample_counts

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [n, vocab] -> [n]


@dataclass(frozen=True)
class Graph:
    """Node and input indices of a model's circuit graph.

    Upstream nodes: ``0`` is the input embedding, then per layer its heads and its MLP. Downstream
    inputs: per layer the query of every head, the key and the value of every key-value head and
    the MLP's input, then the logits.
    """

    n_layers: int
    n_heads: int
    n_kv: int
    parallel: bool  # attention and MLP of a block read the same residual

    @property
    def n_upstream(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def inputs_per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv + 1

    @property
    def n_downstream(self) -> int:
        return self.n_layers * self.inputs_per_layer + 1

    def head(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def layer_inputs(self, layer: int) -> slice:
        """The downstream indices of block ``layer``: queries, keys, values, then the MLP."""
        start = layer * self.inputs_per_layer
        return slice(start, start + self.inputs_per_layer)

    def reach(self, layer: int) -> tuple[int, int]:
        """How many upstream nodes (a prefix) feed block ``layer``'s attention and its MLP."""
        attention = 1 + layer * (self.n_heads + 1)
        return attention, attention if self.parallel else attention + self.n_heads

    def valid(self) -> torch.Tensor:
        """[U, V] bool: the edges of the whole graph."""
        valid = torch.zeros(self.n_upstream, self.n_downstream, dtype=torch.bool)
        for layer in range(self.n_layers):
            attention, mlp = self.reach(layer)
            inputs = self.layer_inputs(layer)
            valid[:attention, inputs.start : inputs.stop - 1] = True
            valid[:mlp, inputs.stop - 1] = True
        valid[:, -1] = True
        return valid

    def owners(self) -> torch.Tensor:
        """[V, U] bool: the upstream node(s) whose computation reads each input (a key-value
        head's inputs are read by every head of its group; the logits by none)."""
        owners = torch.zeros(self.n_downstream, self.n_upstream, dtype=torch.bool)
        group = self.n_heads // self.n_kv
        for layer in range(self.n_layers):
            base = self.layer_inputs(layer).start
            for head in range(self.n_heads):
                owners[base + head, self.head(layer, head)] = True
                kv = head // group
                owners[base + self.n_heads + kv, self.head(layer, head)] = True
                owners[base + self.n_heads + self.n_kv + kv, self.head(layer, head)] = True
            owners[base + self.inputs_per_layer - 1, self.mlp(layer)] = True
        return owners

    def restricted(self, kept: torch.Tensor) -> torch.Tensor:
        """[U, V] bool: the edges between kept nodes ([U] bool; the input and the logits are
        always kept)."""
        kept = kept.clone()
        kept[0] = True
        read = (self.owners() & kept).any(1)
        read[-1] = True
        return self.valid() & kept[:, None] & read[None, :]

    def upstream_names(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    def downstream_names(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}.q" for h in range(self.n_heads)]
            names += [f"a{layer}.g{g}.k" for g in range(self.n_kv)]
            names += [f"a{layer}.g{g}.v" for g in range(self.n_kv)]
            names += [f"m{layer}"]
        return names + ["logits"]


def graph_of(adapter: Adapter) -> Graph:
    return Graph(adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.parallel_residual)


@dataclass
class Trace:
    """One pass: the last position's logits, every node's write [U, B, T, d], every layer's input
    to the attention's output projection and, where asked, the leaves whose gradients are
    ``dm/dx_v`` for every downstream input."""

    logits: torch.Tensor
    outputs: torch.Tensor
    head_inputs: list[torch.Tensor] = field(default_factory=list)  # per layer, W_O's input
    leaves: list[torch.Tensor] = field(default_factory=list)

    def gradients(self) -> torch.Tensor:
        """[B, T, V, d]: the gradient at every downstream input (after ``backward``; zero where
        the metric does not depend on it, as for a held node's inputs)."""
        return torch.cat(
            [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in self.leaves],
            dim=2,
        )


class GraphRunner:
    """Runs a model through the block runner with every downstream input of the graph computed
    from the node writes: patched edges, nodes held at their corrupted writes, or gradient leaves.

    The model's own modules run; hooks replace the projections' queries, keys and values (one
    input per head), the MLP norm's input and the final residual.
    """

    def __init__(self, adapter: Adapter):
        if adapter.norms_after_parts:
            raise LensspaceError(
                f"circuit_search: {adapter.model_type} with its norms after the attention and MLP "
                "(OPT-350m) has no residual stream that sums the nodes' writes; drop the run's "
                "circuit_tasks"
            )
        self.adapter = adapter
        self.runner = BlockRunner(adapter)
        self.graph = graph_of(adapter)
        self.valid = self.graph.valid()
        self._qkv = [
            tuple(
                (w.detach().float(), None if b is None else b.detach().float())
                for w, b in adapter.qkv_weights(layer)
            )
            for layer in range(adapter.n_layers)
        ]
        self._w_o = [adapter.head_out_weights(i).detach().float() for i in range(adapter.n_layers)]

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input node's write: the layer-0 residual [B, T, d]."""
        return self.adapter.embed_tokens(self.adapter.to_device(ids)).float()

    def run(
        self,
        h0: torch.Tensor,
        corrupt: torch.Tensor | None = None,
        circuit: torch.Tensor | None = None,
        fixed: torch.Tensor | None = None,
        held: Trace | None = None,
        leaves: bool = False,
    ) -> Trace:
        """From the input's write ``h0`` [B, T, d] to the last position's logits.

        ``circuit`` [U, V] bool: every edge of the graph outside it has its term replaced by its
        value in ``corrupt`` [U, B, T, d] (the corrupted prompt's writes). ``fixed`` [U] bool holds
        those nodes at their values in ``held`` (the corrupted prompt's pass) for every input (a
        restricted graph): a head's input to the output projection, an MLP's write (its MLP then
        computes nothing). ``leaves``
        adds a zero leaf to every downstream input, so that ``backward`` gives ``dm/dx_v``.
        """
        adapter, graph = self.adapter, self.graph
        batch, length, d = h0.shape
        n_heads, n_kv = graph.n_heads, graph.n_kv
        self.runner.block_context(batch, length)  # its recording pass, before any hook is on
        outputs = h0.new_empty(graph.n_upstream, batch, length, d)
        outputs[0] = h0.detach()
        if circuit is not None and corrupt is None:
            raise ValueError("patching needs the corrupted prompt's writes")
        if fixed is not None and held is None:
            raise ValueError("holding nodes needs the corrupted prompt's pass")
        fixed = None if fixed is None else fixed.cpu()  # decisions in Python: kept on the CPU
        patching = circuit is not None
        if patching:
            kept = circuit.cpu() & self.valid
            change = torch.empty_like(outputs)  # each node's write minus its corrupted write
            change[0] = outputs[0] - corrupt[0]
            running = change[0].clone()  # the sum of ``change`` over the nodes recorded so far
        trace = Trace(torch.empty(0), outputs)

        def record(nodes: slice, writes: torch.Tensor) -> None:
            nonlocal running
            outputs[nodes] = writes.detach()
            if patching:
                change[nodes] = outputs[nodes] - corrupt[nodes]
                running = running + change[nodes].sum(0)

        def patched(
            h: torch.Tensor, reach: int, total: torch.Tensor, inputs: slice
        ) -> torch.Tensor:
            """[B, T, n, d]: the residual ``h`` [B, T, d] as each of ``inputs`` reads it, every
            excluded edge's term swapped for its corrupted value (``total``: the sum of
            ``change`` over the ``reach`` nodes feeding them)."""
            n = inputs.stop - inputs.start
            if not patching:
                return h[:, :, None, :].expand(batch, length, n, d)
            edges = kept[:reach, inputs]
            # the upstream nodes with a kept edge (a list: no tensor of data-dependent shape)
            rows = torch.tensor([i for i, kept_any in enumerate(edges.any(1).tolist()) if kept_any])
            x = (h - total)[None].expand(n, batch, length, d)
            if len(rows):
                weights = edges[rows].T.to(device=h.device, dtype=h.dtype)
                restored = weights @ change[rows.to(h.device)].flatten(1)
                x = x + restored.reshape(n, batch, length, d)
            return x.permute(1, 2, 0, 3)

        def leaf(x: torch.Tensor) -> torch.Tensor:
            if not leaves:
                return x
            zero = torch.zeros_like(x, requires_grad=True)
            trace.leaves.append(zero)
            return x + zero

        for layer in range(adapter.n_layers):
            attention_reach, mlp_reach = graph.reach(layer)
            inputs = graph.layer_inputs(layer)
            heads = slice(graph.head(layer, 0), graph.head(layer, n_heads))
            (w_q, b_q), (w_k, b_k), (w_v, b_v) = self._qkv[layer]
            state: dict[str, object] = {"h": h0}
            if patching:
                state["block_total"] = running

            def qkv(h: torch.Tensor, layer: int = layer) -> list[torch.Tensor]:
                total = state.get("block_total")
                x = leaf(patched(h, attention_reach, total, slice(inputs.start, inputs.stop - 1)))
                normed = adapter.attention_norm(layer)(x)

                def project(part: slice, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
                    y = torch.einsum("btnd,ned->btne", normed[:, :, part], w)
                    return y if b is None else y + b

                q = project(slice(0, n_heads), w_q, b_q)
                k = project(slice(n_heads, n_heads + n_kv), w_k, b_k)
                v = project(slice(n_heads + n_kv, n_heads + 2 * n_kv), w_v, b_v)
                return adapter.qkv_outputs(q, k, v)

            def replace_projection(index: int):
                def hook(_module, _args, out):
                    if "qkv" not in state:
                        state["qkv"] = qkv(state["h"])
                    return state["qkv"][index].to(out.dtype).reshape(out.shape)

                return hook

            def record_heads(_module, args, out, layer: int = layer, heads: slice = heads):
                trace.head_inputs.append(args[0].detach())
                scaled = args[0] / adapter.attention_write_scale(layer, out)
                o = scaled.reshape(batch, length, n_heads, -1).float()
                record(heads, torch.einsum("bthe,hed->hbtd", o, self._w_o[layer]))

            def hold_heads(_module, args, layer: int = layer, heads: slice = heads):
                kept = ~fixed[heads]
                if bool(kept.all()):
                    return None
                x = args[0]
                o = x.reshape(*x.shape[:-1], n_heads, -1)
                stored = held.head_inputs[layer].reshape(o.shape).to(x.dtype)
                o = torch.where(kept.to(x.device)[:, None], o, stored)
                return (o.reshape(x.shape), *args[1:])

            def mlp_input(_module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                total = None
                if patching:
                    total = state["block_total"] if graph.parallel else running
                x = patched(
                    h.reshape(batch, length, d).float(),
                    mlp_reach,
                    total,
                    slice(inputs.stop - 1, inputs.stop),
                )
                x = leaf(x).to(h.dtype).reshape(h.shape)  # OPT's MLP runs on [B * T, d]
                if args:
                    return (x, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": x}

            def mlp_output(_module, _args, out, layer: int = layer):
                node = graph.mlp(layer)
                if fixed is not None and bool(fixed[node]):
                    record(slice(node, node + 1), held.outputs[node : node + 1])
                    return held.outputs[node].to(out.dtype).reshape(out.shape)
                record(slice(node, node + 1), out.reshape(1, batch, length, d).float())
                return None

            handles = [
                module.register_forward_hook(replace_projection(i))
                for i, module in enumerate(adapter.qkv_modules(layer))
            ]
            if fixed is not None:
                handles.append(adapter.attention_out(layer).register_forward_pre_hook(hold_heads))
            handles.append(adapter.attention_out(layer).register_forward_hook(record_heads))
            handles.append(
                adapter.mlp_norm(layer).register_forward_pre_hook(mlp_input, with_kwargs=True)
            )
            handles.append(adapter.mlp(layer).register_forward_hook(mlp_output))
            skip = fixed is not None and bool(fixed[graph.mlp(layer)])
            try:
                with adapter.mlp_skipped(layer) if skip else nullcontext():
                    h0 = self.runner.call_block(layer, h0)
            finally:
                for handle in handles:
                    handle.remove()
        final = slice(graph.n_downstream - 1, graph.n_downstream)
        z = leaf(patched(h0, graph.n_upstream, running if patching else None, final))[:, :, 0]
        trace.logits = adapter.logits(z[:, -1]).float()
        return trace


@dataclass
class Cost:
    """Passes counted on the whole graph and on a restricted one, their FLOPs and wall time."""

    full_forward: int = 0
    full_backward: int = 0
    restricted_forward: int = 0
    restricted_backward: int = 0
    flops: float = 0.0
    seconds: float = 0.0

    def add(self, other: Cost) -> Cost:
        return Cost(
            *(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__)  # type: ignore[arg-type]
        )


class FlopCounter:
    """FLOPs of one pass as a function of the nodes it computes: 2 per weight per token for every
    head's and MLP's projections (a head: its query, its share of its group's key and value, its
    output projection), the attention products, and the logits at the last position. The
    weights are frozen, so a backward pass computes input gradients only: once the projections'
    products, twice the attention products (both their operands are activations)."""

    def __init__(self, adapter: Adapter, length: int, batch: int):
        graph = graph_of(adapter)
        weights = torch.zeros(graph.n_upstream, dtype=torch.float64)
        products = torch.zeros(graph.n_upstream, dtype=torch.float64)
        group = graph.n_heads // graph.n_kv
        for layer in range(adapter.n_layers):
            (w_q, _), (w_k, _), (w_v, _) = adapter.qkv_weights(layer)
            w_o = adapter.head_out_weights(layer)
            heads = slice(graph.head(layer, 0), graph.head(layer, graph.n_heads))
            weights[heads] = (
                w_q[0].numel() + (w_k[0].numel() + w_v[0].numel()) / group + w_o[0].numel()
            )
            products[heads] = 2 * length * w_o.shape[1]  # scores and the weighted sum
            mlp = sum(w.numel() for w in adapter.mlp_in_weights(layer))
            weights[graph.mlp(layer)] = mlp + adapter.neuron_out_weights(layer).numel()
        self.weights = 2 * weights * length * batch
        self.products = 2 * products * length * batch
        self.logits = 2.0 * adapter.unembedding.numel() * batch

    def _kept(self, values: torch.Tensor, kept: torch.Tensor | None) -> float:
        return float(values.sum() if kept is None else (values * kept.cpu().double()).sum())

    def forward(self, kept: torch.Tensor | None = None) -> float:
        """FLOPs of a forward pass computing the ``kept`` nodes [U] bool (all by default)."""
        return self._kept(self.weights + self.products, kept) + self.logits

    def backward(self, kept: torch.Tensor | None = None) -> float:
        """FLOPs of the backward pass through the ``kept`` nodes."""
        return self._kept(self.weights + 2 * self.products, kept) + self.logits


@dataclass(frozen=True)
class Prompts:
    """A task's prompts as the input node's writes, and its metric."""

    clean: torch.Tensor  # [B, T, d]
    corrupt: torch.Tensor
    metric: Metric


def _sum_metric(trace: Trace, metric: Metric) -> torch.Tensor:
    return metric(trace.logits).sum()


@dataclass
class Scores:
    """Edge scores [U, V] (zero outside ``allowed``), the edges searched and the search's cost;
    ``plain``: plain EAP's scores (the ``alpha = 1`` step alone) and what they alone would cost."""

    edges: torch.Tensor
    allowed: torch.Tensor
    cost: Cost
    plain: torch.Tensor
    plain_cost: Cost


def eap_ig(
    runner: GraphRunner,
    prompts: Prompts,
    steps: int,
    counter: FlopCounter,
    kept: torch.Tensor | None = None,
    corrupt_run: Trace | None = None,
) -> Scores:
    """EAP-IG scores of every edge, on the whole graph or on the one restricted to ``kept``
    nodes [U] bool (the others held at their values on the corrupted prompt).

    The gradient is averaged at ``alpha = j / steps``, ``j = 1..steps``, of the input between the
    corrupted and the clean prompt; a score is the mean over prompts of the edge's
    ``(corrupt - clean) . gradient`` summed over positions, the clean writes those of the last
    step (``alpha = 1``). ``corrupt_run``: the corrupted prompt's pass where a caller already has
    it (then neither counted nor timed here).
    """
    if steps < 1:
        raise ValueError("EAP-IG needs at least one step")
    graph = runner.graph
    start = time.perf_counter()
    cost = Cost()
    full = kept is None
    if kept is not None:
        kept = kept.clone()
        kept[0] = True
    fixed = None if full else ~kept
    allowed = runner.valid if full else graph.restricted(kept)
    if corrupt_run is None:
        with torch.no_grad():
            corrupt_run = runner.run(prompts.corrupt)
        cost.full_forward += 1
        cost.flops += counter.forward()
    setup = time.perf_counter() - start
    step_flops = counter.forward(kept) + counter.backward(kept)
    gradient, last = None, None
    for j in range(1, steps + 1):
        step_start = time.perf_counter()
        alpha = j / steps
        h0 = prompts.corrupt + alpha * (prompts.clean - prompts.corrupt)
        trace = runner.run(h0, fixed=fixed, held=corrupt_run, leaves=True)
        _sum_metric(trace, prompts.metric).backward()
        last = trace.gradients()
        gradient = last if gradient is None else gradient + last
        cost.flops += step_flops
        if full:
            cost.full_forward += 1
            cost.full_backward += 1
        else:
            cost.restricted_forward += 1
            cost.restricted_backward += 1
        last_seconds = time.perf_counter() - step_start
    # the last step ran the clean prompt: its writes are the clean ones (held nodes: corrupted)
    change = (corrupt_run.outputs - trace.outputs).reshape(graph.n_upstream, -1)
    batch = trace.outputs.shape[1]

    def edge_scores(g: torch.Tensor) -> torch.Tensor:
        v = g.permute(2, 0, 1, 3).reshape(graph.n_downstream, -1)
        edges = (change @ v.T / batch).cpu()
        return torch.where(allowed, edges, torch.zeros_like(edges))

    edges = edge_scores(gradient / steps)
    plain = edge_scores(last)
    cost.seconds = time.perf_counter() - start
    plain_cost = Cost(
        full_forward=(cost.full_forward - (steps if full else 0)) + int(full),
        full_backward=int(full),
        restricted_forward=int(not full),
        restricted_backward=int(not full),
        flops=cost.flops - (steps - 1) * step_flops,
        seconds=setup + last_seconds,
    )
    return Scores(edges, allowed, cost, plain, plain_cost)


def node_scores(edges: torch.Tensor, graph: Graph) -> torch.Tensor:
    """[U]: a node's attribution, the sum of its outgoing edges' scores (its write's
    ``(corrupt - clean) . dm/dwrite``), absolute; the input node gets ``inf`` (always kept)."""
    scores = edges.sum(1).abs()
    scores[0] = math.inf
    return scores


def top_nodes(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """[U] bool: the input and the top ``fraction`` of the other nodes by ``scores``."""
    n = len(scores) - 1
    keep = max(1, round(fraction * n))
    order = torch.argsort(scores[1:].double(), descending=True, stable=True)[:keep] + 1
    kept = torch.zeros(len(scores), dtype=torch.bool)
    kept[0] = True
    kept[order] = True
    return kept


def random_nodes(n_upstream: int, fraction: float, seed: int) -> torch.Tensor:
    """[U] bool: the input and a seeded random ``fraction`` of the other nodes."""
    scores = torch.rand(n_upstream, generator=torch.Generator().manual_seed(seed))
    return top_nodes(scores, fraction)


def top_edges(scores: Scores, n_edges: int) -> torch.Tensor:
    """[U, V] bool: the ``n_edges`` allowed edges of largest absolute score (all allowed edges
    where fewer)."""
    flat = scores.edges.abs().flatten().double()
    flat[~scores.allowed.flatten()] = -1.0
    n = min(n_edges, int(scores.allowed.sum()))
    chosen = torch.argsort(flat, descending=True, stable=True)[:n]
    circuit = torch.zeros_like(scores.allowed)
    circuit.view(-1)[chosen] = True
    return circuit


@torch.no_grad()
def circuit_metric(
    runner: GraphRunner, prompts: Prompts, corrupt_run: Trace, circuit: torch.Tensor
) -> torch.Tensor:
    """[B]: the metric with every edge of the graph outside ``circuit`` [U, V] patched."""
    trace = runner.run(prompts.clean, corrupt=corrupt_run.outputs, circuit=circuit)
    return prompts.metric(trace.logits)


def budget_edges(graph: Graph, budget: float) -> int:
    """Edges in a circuit of ``budget`` (a fraction of the whole graph's edges)."""
    return max(1, round(budget * int(graph.valid().sum())))


@dataclass(frozen=True)
class SearchSettings:
    """The search's integrated-gradient steps, the edge budgets of the faithfulness curve (fractions
    of the whole graph's edges), the random controls' draws and the seed."""

    ig_steps: int = 5
    budgets: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5)
    random_draws: int = 2
    seed: int = 0

    @classmethod
    def from_params(cls, section: dict, seed: int = 0) -> SearchSettings:
        """From the config's ``circuit_search`` block (the full search's jobs have no random
        draws)."""
        return cls(
            ig_steps=section["ig_steps"],
            budgets=tuple(section["budgets"]),
            random_draws=section.get("random_draws", 0),
            seed=seed,
        )


def prompts_of(
    runner: GraphRunner, clean: torch.Tensor, corrupt: torch.Tensor, metric: Metric
) -> Prompts:
    """A task's token ids [B, T] as the input node's writes."""
    return Prompts(runner.embed(clean), runner.embed(corrupt), metric)


def _printable(text: str) -> str:
    """``text`` with its unprintable characters (tabs, newlines, stray bytes) escaped, so that a
    TSV cell holds it."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _ids(tokens: torch.Tensor) -> str:
    return " ".join(str(t) for t in tokens.tolist())


def prompt_rows(task: Task, clean: torch.Tensor, corrupt: torch.Tensor) -> list[dict]:
    """Per prompt: its text and answer, and the metric, whether the model prefers the right
    answer and whether it is the top token, on the clean and the corrupted prompt (last-position
    logits ``clean``, ``corrupt`` [n, vocab])."""
    columns = {
        "clean_metric": task.metric(clean),
        "corrupt_metric": task.metric(corrupt),
        "clean_correct": task.correct(clean),
        "clean_top1": task.top1(clean),
        "corrupt_correct": task.correct(corrupt),
        "corrupt_top1": task.top1(corrupt),
    }
    return [
        {
            "prompt": i,
            "text": _printable(text),
            "answer": _printable(answer),
            "clean_ids": _ids(task.clean[i]),
            "corrupt_ids": _ids(task.corrupt[i]),
            **{key: values[i].item() for key, values in columns.items()},
        }
        for i, (text, answer) in enumerate(zip(task.texts, task.answers, strict=True))
    ]


def task_prompts(
    runner: GraphRunner, tokenizer, name: str, section: dict, seed: int, recorded: pd.DataFrame
) -> Prompts:
    """Task ``name`` built again (it is seeded) and checked against its recorded prompts."""
    settings = TaskSettings.from_params(section, seed)
    task = make_task(name, tokenizer, runner.adapter.unembedding.shape[0], settings)
    built = [_ids(row) for row in task.clean] + [_ids(row) for row in task.corrupt]
    if built != recorded["clean_ids"].tolist() + recorded["corrupt_ids"].tolist():
        raise LensspaceError(
            f"circuit task {name!r}: the prompts differ from those recorded in prompts.tsv; "
            "rerun its circuit_task job (snakemake -R circuit_task)"
        )
    return prompts_of(runner, task.clean, task.corrupt, task.metric)


def read_shares(adapter: Adapter, k: int) -> torch.Tensor:
    """[U]: each node's circuit-beginning label, the share of its read weights' energy (queries,
    keys and values, or the MLP's input projections, times the norm's gain) that lies in the top-k
    right singular subspace of the embedding matrix: how much of what it reads is token identity
    as the embedding writes it. The input node gets ``inf``."""
    graph = graph_of(adapter)
    embedding = adapter.embedding_matrix.detach().double().cpu()
    _, vectors = torch.linalg.eigh(embedding.T @ embedding)  # ascending
    basis = vectors[:, -k:]
    shares = torch.full((graph.n_upstream,), math.inf, dtype=torch.float64)
    offset = adapter.arch.norm_gain_offset

    def gain(norm: torch.nn.Module) -> torch.Tensor:
        weight = getattr(norm, "weight", None)
        if weight is None:
            return torch.ones(adapter.d_model, dtype=torch.float64)
        return weight.detach().double().cpu() + offset

    def share(read: torch.Tensor) -> float:
        return float((read @ basis).square().sum() / read.square().sum())

    group = graph.n_heads // graph.n_kv
    for layer in range(adapter.n_layers):
        g = gain(adapter.attention_norm(layer))
        (w_q, _), (w_k, _), (w_v, _) = adapter.qkv_weights(layer)
        for head in range(graph.n_heads):
            kv = head // group
            read = torch.cat([w_q[head], w_k[kv], w_v[kv]]).detach().double().cpu() * g
            shares[graph.head(layer, head)] = share(read)
        read = torch.cat(adapter.mlp_in_weights(layer)).detach().double().cpu()
        shares[graph.mlp(layer)] = share(read * gain(adapter.mlp_norm(layer)))
    return shares


def _percentile_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks of ``values`` scaled to (0, 1], ties broken by position."""
    order = torch.argsort(values.double(), stable=True)
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    return ranks / len(values)


def label_scores(ends: torch.Tensor, beginnings: torch.Tensor) -> torch.Tensor:
    """[U]: a node's candidacy, the larger of its percentile ranks among the other nodes as a
    circuit end (``ends``) and as a beginning (``beginnings``); the input node gets ``inf``."""
    scores = torch.full((len(ends),), math.inf, dtype=torch.float64)
    scores[1:] = torch.maximum(_percentile_ranks(ends[1:]), _percentile_ranks(beginnings[1:]))
    return scores


def _metric_rows(
    method: str, fraction: float, draw: int, budget: float, n_edges: int, metric: torch.Tensor
) -> list[dict]:
    return [
        {
            "method": method,
            "fraction": fraction,
            "draw": draw,
            "budget": budget,
            "n_edges": n_edges,
            "prompt": i,
            "metric": float(m),
        }
        for i, m in enumerate(metric.tolist())
    ]


def _cost_row(
    method: str,
    fraction: float,
    draw: int,
    cost: Cost,
    graph: Graph,
    kept: torch.Tensor,
    edges: int,
) -> dict:
    mlps = [graph.mlp(layer) for layer in range(graph.n_layers)]
    return {
        "method": method,
        "fraction": fraction,
        "draw": draw,
        "kept_nodes": int(kept.sum()),
        "kept_mlps": int(kept[mlps].sum()),
        "edges_searched": edges,
        "full_forward": cost.full_forward,
        "full_backward": cost.full_backward,
        "restricted_forward": cost.restricted_forward,
        "restricted_backward": cost.restricted_backward,
        "flops": cost.flops,
        "seconds": cost.seconds,
    }


@dataclass
class SearchResult:
    """A search's per-prompt circuit metrics at every budget, its cost, and its recall of the full
    search's top edges at every budget."""

    metrics: list[dict]
    costs: list[dict]
    recall: list[dict]
    anchors: list[dict] = field(default_factory=list)


def curve(
    runner: GraphRunner,
    prompts: Prompts,
    corrupt_run: Trace,
    scores: Scores,
    settings: SearchSettings,
    label: tuple[str, float, int],
    reference: torch.Tensor | None = None,
) -> tuple[list[dict], list[dict]]:
    """Per-prompt metric rows at every budget of ``scores``' circuits and, against the full
    search's edge scores ``reference`` [U, V], the recall of its top edges at each budget."""
    method, fraction, draw = label
    metrics, recall = [], []
    for budget in settings.budgets:
        n_edges = budget_edges(runner.graph, budget)
        circuit = top_edges(scores, n_edges)
        metric = circuit_metric(runner, prompts, corrupt_run, circuit)
        metrics += _metric_rows(method, fraction, draw, budget, int(circuit.sum()), metric)
        if reference is not None:
            full = top_edges(Scores(reference, runner.valid, Cost(), reference, Cost()), n_edges)
            recall.append(
                {
                    "method": method,
                    "fraction": fraction,
                    "draw": draw,
                    "budget": budget,
                    "n_edges": n_edges,
                    "recall": float((full & circuit).sum()) / n_edges,
                }
            )
    return metrics, recall


def full_search(
    runner: GraphRunner, prompts: Prompts, settings: SearchSettings
) -> tuple[Scores, SearchResult]:
    """EAP-IG over the whole graph and its faithfulness curve; plain EAP's node attributions come
    with it (the per-task pruning control)."""
    counter = FlopCounter(runner.adapter, prompts.clean.shape[1], prompts.clean.shape[0])
    scores = eap_ig(runner, prompts, settings.ig_steps, counter)
    with torch.no_grad():
        corrupt_run = runner.run(prompts.corrupt)
        clean = prompts.metric(runner.run(prompts.clean).logits)
    patched = prompts.metric(corrupt_run.logits)  # every edge patched: the corrupted run
    anchors = [
        {"prompt": i, "clean_metric": float(c), "patched_metric": float(p)}
        for i, (c, p) in enumerate(zip(clean.tolist(), patched.tolist(), strict=True))
    ]
    metrics, _ = curve(runner, prompts, corrupt_run, scores, settings, ("full", 1.0, 0))
    graph, n_edges = runner.graph, int(runner.valid.sum())
    every = torch.ones(graph.n_upstream, dtype=torch.bool)
    costs = [
        _cost_row("full", 1.0, 0, scores.cost, graph, every, n_edges),
        _cost_row("node_attribution", 1.0, 0, scores.plain_cost, graph, every, n_edges),
    ]
    return scores, SearchResult(metrics, costs, [], anchors)


def restricted_searches(
    runner: GraphRunner,
    prompts: Prompts,
    settings: SearchSettings,
    fraction: float,
    labels: torch.Tensor,
    full: Scores,
    desc: str = "",
) -> SearchResult:
    """At ``fraction`` of the nodes: the search restricted to the candidates by ``labels`` [U],
    to the top nodes by the full graph's plain-EAP attribution (per-task pruning, whose cost
    includes that attribution pass), and to ``random_draws`` random node sets of the same size."""
    graph = runner.graph
    counter = FlopCounter(runner.adapter, prompts.clean.shape[1], prompts.clean.shape[0])
    start = time.perf_counter()
    with torch.no_grad():
        corrupt_run = runner.run(prompts.corrupt)
    corrupt_cost = Cost(
        full_forward=1, flops=counter.forward(), seconds=time.perf_counter() - start
    )
    pruning = Cost(
        full.plain_cost.full_forward,
        full.plain_cost.full_backward,
        flops=full.plain_cost.flops,
        seconds=full.plain_cost.seconds,
    )  # its corrupted pass is the one that holds the other nodes
    candidates = [
        ("labels", 0, top_nodes(labels, fraction), corrupt_cost),
        ("attribution", 0, top_nodes(node_scores(full.plain, graph), fraction), pruning),
    ]
    for draw in range(settings.random_draws):
        seed = settings.seed + 1000 * draw + round(fraction * 1000)
        kept = random_nodes(graph.n_upstream, fraction, seed)
        candidates.append(("random", draw, kept, corrupt_cost))
    result = SearchResult([], [], [])
    for method, draw, kept, before in tqdm(candidates, desc=desc, file=sys.stderr):
        scores = eap_ig(runner, prompts, settings.ig_steps, counter, kept, corrupt_run)
        cost = before.add(scores.cost)
        metrics, recall = curve(
            runner, prompts, corrupt_run, scores, settings, (method, fraction, draw), full.edges
        )
        result.metrics += metrics
        result.recall += recall
        result.costs.append(
            _cost_row(method, fraction, draw, cost, graph, kept, int(scores.allowed.sum()))
        )
    return result


TIMED_COLUMNS = ("seconds", "wall_time")  # measured wall times: the columns no rerun reproduces
GOAL_FAITHFULNESS = 0.95  # of the full search's, by area under the curve
GOAL_COMPUTE = 0.30  # of the full search's FLOPs


def auc_weights(budgets: tuple[float, ...] | list[float]) -> torch.Tensor:
    """Trapezoid weights over ``log10(budget)``, summing to 1: the area under a faithfulness curve
    is ``weights @ faithfulness``, the mean faithfulness over the budgets' log range."""
    x = torch.tensor(sorted(budgets), dtype=torch.float64).log10()
    if len(x) == 1:
        return torch.ones(1, dtype=torch.float64)
    gaps = x[1:] - x[:-1]
    weights = torch.zeros(len(x), dtype=torch.float64)
    weights[:-1] += gaps / 2
    weights[1:] += gaps / 2
    return weights / weights.sum()


def _numerators(metrics: pd.DataFrame, corrupt: torch.Tensor, budgets: list[float]) -> torch.Tensor:
    """[n_budgets, n_prompts]: ``metric(circuit) - metric(all patched)``, averaged over draws."""
    table = metrics.pivot_table(index="budget", columns="prompt", values="metric", aggfunc="mean")
    values = torch.tensor(table.loc[budgets].to_numpy(), dtype=torch.float64)
    return values - corrupt[None]


def _interval(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> tuple[float, float, float]:
    lo, hi = ratio_interval(a, b, counts)
    return float(a.sum() / b.sum()), lo, hi


def summarise(
    anchors: pd.DataFrame,
    metrics: pd.DataFrame,
    costs: pd.DataFrame,
    recall: pd.DataFrame,
    n_boot: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per search (method and fraction; random draws averaged) and budget: faithfulness, its
    ratio to the full search's and the recall of its top edges; per search: the area under the
    curve, its ratio to the full search's, its difference from the random control's, and the
    compute ratios.

    Faithfulness is a ratio of sums over prompts, ``sum(m_circuit - m_patched) / sum(m_clean -
    m_patched)``; a ratio between two searches is ``sum(numerator_A) / sum(numerator_B)`` on the
    same prompts; a difference of areas is ``sum(numerator_A - numerator_B) / sum(m_clean -
    m_patched)``. Every interval is the bootstrap-t of :func:`~lensspace.stats.ratio_interval`
    over prompts, with one set of resamples for all (paired). ``separated``: the percentile
    interval of the mean ``m_clean - m_patched`` lies above zero; where it does not, every ratio
    is undefined and no goal is met.
    """
    clean = torch.tensor(anchors["clean_metric"].to_numpy(), dtype=torch.float64)
    corrupt = torch.tensor(anchors["patched_metric"].to_numpy(), dtype=torch.float64)
    denominator = clean - corrupt
    counts = resample_counts(len(clean), n_boot, seed)
    budgets = sorted(metrics["budget"].unique())
    weights = auc_weights(budgets)
    keys = metrics[["method", "fraction"]].drop_duplicates().itertuples(index=False)
    numerators = {
        (m, f): _numerators(
            metrics[(metrics.method == m) & (metrics.fraction == f)], corrupt, budgets
        )
        for m, f in keys
    }
    full = numerators[("full", 1.0)]
    means = counts @ denominator / len(denominator)
    separated = bool(torch.quantile(means, 0.025) > 0)  # clean and corrupted prompts differ
    mean_costs = costs.groupby(["method", "fraction"])[["flops", "seconds", "kept_mlps"]].mean()
    full_flops, full_seconds, _ = mean_costs.loc[("full", 1.0)]
    mean_recall = recall.groupby(["method", "fraction", "budget"])["recall"].mean()
    per_budget, per_search = [], []
    for (method, fraction), values in numerators.items():
        for b, budget in enumerate(budgets):
            f, f_lo, f_hi = _interval(values[b], denominator, counts)
            r, r_lo, r_hi = _interval(values[b], full[b], counts)
            per_budget.append(
                {
                    "method": method,
                    "fraction": fraction,
                    "budget": budget,
                    "n_edges": float(
                        metrics[
                            (metrics.method == method)
                            & (metrics.fraction == fraction)
                            & (metrics.budget == budget)
                        ]["n_edges"].mean()
                    ),
                    "faithfulness": f,
                    "faithfulness_lo": f_lo,
                    "faithfulness_hi": f_hi,
                    "relative": r,
                    "relative_lo": r_lo,
                    "relative_hi": r_hi,
                    "recall": float(mean_recall.get((method, fraction, budget), 1.0)),
                }
            )
        area = weights @ values
        auc, auc_lo, auc_hi = _interval(area, denominator, counts)
        rel, rel_lo, rel_hi = _interval(area, weights @ full, counts)
        random = numerators.get(("random", fraction))
        vs = (math.nan,) * 3
        if random is not None and method != "random":
            vs = _interval(area - weights @ random, denominator, counts)
        flops, seconds, kept_mlps = mean_costs.loc[(method, fraction)]
        compute = flops / full_flops
        per_search.append(
            {
                "method": method,
                "fraction": fraction,
                "auc": auc,
                "auc_lo": auc_lo,
                "auc_hi": auc_hi,
                "relative_auc": rel,
                "relative_auc_lo": rel_lo,
                "relative_auc_hi": rel_hi,
                "vs_random": vs[0],
                "vs_random_lo": vs[1],
                "vs_random_hi": vs[2],
                "kept_mlps": float(kept_mlps),
                "compute": compute,
                "wall_time": seconds / full_seconds,
                "recall": float(
                    sum(mean_recall.get((method, fraction, b), 1.0) for b in budgets) / len(budgets)
                ),
                "goal_met": separated
                and bool(rel >= GOAL_FAITHFULNESS and compute <= GOAL_COMPUTE),
                "separated": separated,
            }
        )
    return pd.DataFrame(per_budget), pd.DataFrame(per_search)


def ends_from_tables(graph: Graph, heads: pd.DataFrame, mlps: pd.DataFrame) -> torch.Tensor:
    """[U]: each node's circuit-end label, the output-subspace share of its write through its
    layer's lens (H1's ``heads.tsv`` and ``mlp.tsv``); the input node gets ``inf``."""
    ends = torch.full((graph.n_upstream,), math.inf, dtype=torch.float64)
    for row in heads.itertuples(index=False):
        ends[graph.head(int(row.layer), int(row.head))] = float(row.output_fraction)
    for row in mlps.itertuples(index=False):
        ends[graph.mlp(int(row.layer))] = float(row.output_fraction)
    return ends


def label_rows(graph: Graph, ends: torch.Tensor, beginnings: torch.Tensor) -> list[dict]:
    """One row per node but the input: its labels and its candidacy (:func:`label_scores`)."""
    scores = label_scores(ends, beginnings)
    rows = []
    for index, name in enumerate(graph.upstream_names()):
        if index == 0:
            continue
        rows.append(
            {
                "node": name,
                "kind": "mlp" if name.startswith("m") else "head",
                "end": float(ends[index]),
                "beginning": float(beginnings[index]),
                "score": float(scores[index]),
            }
        )
    return rows


def labels_from_table(graph: Graph, labels: pd.DataFrame) -> torch.Tensor:
    """[U] candidacy scores from :func:`label_rows`' table, the input node's ``inf`` restored."""
    index = {name: i for i, name in enumerate(graph.upstream_names())}
    scores = torch.full((graph.n_upstream,), math.inf, dtype=torch.float64)
    for row in labels.itertuples(index=False):
        if row.node not in index:
            raise LensspaceError(f"circuit labels: node {row.node!r} is not in this model's graph")
        scores[index[row.node]] = float(row.score)
    return scores


def circuit_rows(graph: Graph, scores: Scores, n_edges: int) -> list[dict]:
    """The search's top ``n_edges`` edges in rank order: every smaller circuit is a prefix."""
    flat = scores.edges.abs().flatten().double()
    flat[~scores.allowed.flatten()] = -1.0
    order = torch.argsort(flat, descending=True, stable=True)[:n_edges]
    up, down = graph.upstream_names(), graph.downstream_names()
    n_down = graph.n_downstream
    return [
        {
            "rank": rank + 1,
            "upstream": up[int(i) // n_down],
            "downstream": down[int(i) % n_down],
            "score": float(scores.edges.flatten()[i]),
        }
        for rank, i in enumerate(order.tolist())
    ]


def cost_of(row: dict) -> Cost:
    """A :class:`Cost` from a costs table's row."""
    return Cost(
        **{name: type(getattr(Cost(), name))(row[name]) for name in Cost.__dataclass_fields__}
    )
