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
other node at its corrupted write, which a runner that skips them never computes: its cost is
counted in FLOPs of the nodes it keeps (:class:`Cost`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lensspace.adapter import Adapter
from lensspace.errors import LensspaceError
from lensspace.runner import BlockRunner

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
    """One pass: the last position's logits, every node's write [U, B, T, d] and, where asked,
    the leaves whose gradients are ``dm/dx_v`` for every downstream input."""

    logits: torch.Tensor
    outputs: torch.Tensor
    leaves: list[torch.Tensor] = field(default_factory=list)

    def gradients(self) -> torch.Tensor:
        """[B, T, V, d]: the gradient at every downstream input (after ``backward``)."""
        return torch.cat([leaf.grad for leaf in self.leaves], dim=2)


def _attention_write_module(adapter: Adapter, layer: int) -> torch.nn.Module:
    norm = adapter.attention_write_norm(layer)
    return norm if norm is not None else adapter.attention(layer)


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
        leaves: bool = False,
    ) -> Trace:
        """From the input's write ``h0`` [B, T, d] to the last position's logits.

        ``circuit`` [U, V] bool: every edge of the graph outside it has its term replaced by its
        value in ``corrupt`` [U, B, T, d] (the corrupted prompt's writes). ``fixed`` [U] bool holds
        those nodes' writes at ``corrupt`` for every input (a restricted graph). ``leaves`` adds a
        zero leaf to every downstream input, so that ``backward`` gives ``dm/dx_v``.
        """
        adapter, graph = self.adapter, self.graph
        batch, length, d = h0.shape
        n_heads, n_kv = graph.n_heads, graph.n_kv
        outputs = h0.new_empty(graph.n_upstream, batch, length, d)
        outputs[0] = h0.detach()
        if (circuit is not None or fixed is not None) and corrupt is None:
            raise ValueError("patching needs the corrupted prompt's writes")
        fixed = None if fixed is None else fixed.to(h0.device)
        patching = circuit is not None
        if patching:
            kept = (circuit & self.valid).to(h0.device)
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
            rows = edges.any(1).nonzero().flatten()
            x = (h - total)[None].expand(n, batch, length, d)
            if len(rows):
                restored = edges[rows].T.to(h.dtype) @ change[rows].flatten(1)
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
                scaled = args[0] / adapter.attention_write_scale(layer, out)
                o = scaled.reshape(batch, length, n_heads, -1).float()
                writes = torch.einsum("bthe,hed->hbtd", o, self._w_o[layer])
                state["heads"] = writes
                if fixed is None:
                    record(heads, writes)

            def hold_heads(_module, _args, out, heads: slice = heads):
                held = fixed[heads]
                writes = torch.where(held[:, None, None, None], corrupt[heads], state["heads"])
                record(heads, writes)
                if not bool(held.any()):
                    return None
                write = out[0] if isinstance(out, tuple) else out
                edited = write + (writes - state["heads"]).sum(0).to(write.dtype).reshape(
                    write.shape
                )
                return (edited, *out[1:]) if isinstance(out, tuple) else edited

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
                    record(slice(node, node + 1), corrupt[node : node + 1])
                    return corrupt[node].to(out.dtype).reshape(out.shape)
                record(slice(node, node + 1), out.reshape(1, batch, length, d).float())
                return None

            handles = [
                module.register_forward_hook(replace_projection(i))
                for i, module in enumerate(adapter.qkv_modules(layer))
            ]
            handles.append(adapter.attention_out(layer).register_forward_hook(record_heads))
            if fixed is not None:
                module = _attention_write_module(adapter, layer)
                handles.append(module.register_forward_hook(hold_heads))
            handles.append(
                adapter.mlp_norm(layer).register_forward_pre_hook(mlp_input, with_kwargs=True)
            )
            handles.append(adapter.mlp(layer).register_forward_hook(mlp_output))
            try:
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
    """Forward FLOPs of one pass as a function of the nodes it computes: 2 per weight per token
    for every head's and MLP's projections, the attention products, and the logits at the last
    position; a backward pass counts twice its forward."""

    def __init__(self, adapter: Adapter, length: int, batch: int):
        graph = graph_of(adapter)
        per_node = torch.zeros(graph.n_upstream, dtype=torch.float64)
        group = graph.n_heads // graph.n_kv
        for layer in range(adapter.n_layers):
            (w_q, _), (w_k, _), (w_v, _) = adapter.qkv_weights(layer)
            w_o = adapter.head_out_weights(layer)
            head_dim = w_o.shape[1]
            head = (
                w_q[0].numel() + (w_k[0].numel() + w_v[0].numel()) / group + w_o[0].numel()
            ) + 2 * length * head_dim  # scores and the weighted sum, at most ``length`` keys
            per_node[graph.head(layer, 0) : graph.head(layer, graph.n_heads)] = 2 * head
            mlp = sum(w.numel() for w in adapter.mlp_in_weights(layer))
            per_node[graph.mlp(layer)] = 2 * (mlp + adapter.neuron_out_weights(layer).numel())
        self.per_node = per_node * length * batch
        self.logits = 2.0 * adapter.unembedding.numel() * batch

    def forward(self, kept: torch.Tensor | None = None) -> float:
        """FLOPs of a forward pass computing the ``kept`` nodes [U] bool (all by default)."""
        nodes = self.per_node if kept is None else self.per_node[kept.cpu()]
        return float(nodes.sum()) + self.logits


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
    """Edge scores [U, V] (zero outside ``allowed``), the edges searched and the search's cost."""

    edges: torch.Tensor
    allowed: torch.Tensor
    cost: Cost


def eap_ig(
    runner: GraphRunner,
    prompts: Prompts,
    steps: int,
    counter: FlopCounter,
    kept: torch.Tensor | None = None,
    corrupt_run: Trace | None = None,
) -> Scores:
    """EAP-IG scores of every edge, on the whole graph or on the one restricted to ``kept``
    nodes [U] bool (the others held at their corrupted writes).

    The gradient is averaged at ``alpha = j / steps``, ``j = 1..steps``, of the input between the
    corrupted and the clean prompt; a score is the mean over prompts of the edge's
    ``(corrupt - clean) . gradient`` summed over positions. ``corrupt_run``: the corrupted
    prompt's pass where a caller already has it (not counted again).
    """
    graph = runner.graph
    start = time.perf_counter()
    cost = Cost()
    full = kept is None
    if kept is not None:
        kept = kept.clone()
        kept[0] = True
    fixed = None if full else ~kept
    allowed = runner.valid if full else graph.restricted(kept)

    def count(backward: bool) -> None:
        flops = counter.forward(kept) * (3 if backward else 1)
        cost.flops += flops
        if full:
            cost.full_forward += 1
            cost.full_backward += int(backward)
        else:
            cost.restricted_forward += 1
            cost.restricted_backward += int(backward)

    with torch.no_grad():
        if corrupt_run is None:
            corrupt_run = runner.run(prompts.corrupt)
            cost.full_forward += 1
            cost.flops += counter.forward()
        clean = runner.run(prompts.clean, corrupt=corrupt_run.outputs, fixed=fixed)
    count(backward=False)
    change = corrupt_run.outputs - clean.outputs  # [U, B, T, d]; zero for held nodes
    gradient = None
    for j in range(1, steps + 1):
        alpha = j / steps
        h0 = prompts.corrupt + alpha * (prompts.clean - prompts.corrupt)
        trace = runner.run(h0, corrupt=corrupt_run.outputs, fixed=fixed, leaves=True)
        _sum_metric(trace, prompts.metric).backward()
        g = trace.gradients()
        gradient = g if gradient is None else gradient + g
        count(backward=True)
    gradient = gradient / steps
    batch = change.shape[1]
    u = change.reshape(graph.n_upstream, -1)
    v = gradient.permute(2, 0, 1, 3).reshape(graph.n_downstream, -1)
    edges = (u.double() @ v.double().T / batch).float().cpu()
    cost.seconds = time.perf_counter() - start
    return Scores(torch.where(allowed, edges, torch.zeros_like(edges)), allowed, cost)


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


@dataclass(frozen=True)
class Anchors:
    """The metric per prompt [B] of the whole model and with every edge patched."""

    clean: torch.Tensor
    patched: torch.Tensor


@torch.no_grad()
def anchors(runner: GraphRunner, prompts: Prompts, corrupt_run: Trace) -> Anchors:
    clean = prompts.metric(runner.run(prompts.clean).logits)
    empty = torch.zeros_like(runner.valid)
    return Anchors(clean, circuit_metric(runner, prompts, corrupt_run, empty))


def budget_edges(graph: Graph, budget: float) -> int:
    """Edges in a circuit of ``budget`` (a fraction of the whole graph's edges)."""
    return max(1, round(budget * int(graph.valid().sum())))
