"""Nodes, not only layers: a lens for every attention head and MLP, scored on its total effect.

A node (one attention head, or one block's MLP) writes ``w`` into the residual stream. Its total
effect is exact: the node is mean-ablated (its write replaced by its mean over training tokens at
positions 1..) and the model runs on from the cached residual entering its block, through every
later path; the change of the final residual before the norm (``dz``) and of the output
distribution are recorded. Four maps from the write's change ``dw = mean - w`` predict ``dz``:

* ``dla``: the write itself, read through the final norm with its scale frozen at the clean value
  (direct logit attribution: the direct path only);
* ``layer_lens``: ``M dw`` with ``M = I + A_{l+1}`` the layer's tuned-lens translator (the
  circuit-end geometry of :func:`~lensspace.experiments.circuits.write_maps`);
* ``jacobian``: ``J dw``, ``J`` the final residual's response at a position to a change of the
  node's write at that same position, averaged over training positions (forward differences);
* ``node_lens``: the node's own affine lens, least squares from ``w`` to ``dz`` on training tokens
  with a ridge chosen on held-out training sequences.

``none`` (no change predicted) anchors the scale. Each layer job writes per-sequence sums
(:func:`run_layer`); :func:`score_nodes` turns them into R² and KL with intervals, the paired
comparison of the node lens with each baseline, rank correlations across nodes, and output shares
for the induction-head test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm import tqdm
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.divergences import KLReference
from lensspace.errors import LensspaceError
from lensspace.experiments.circuits import layer_permutation_test, write_maps
from lensspace.robustness import CORRECTION
from lensspace.runner import BlockRunner
from lensspace.stats import (
    adjust,
    bootstrap_mean,
    ratio_interval,
    resample_counts,
    sign_test_p,
)
from lensspace.subspaces import select

BASELINES = ("dla", "layer_lens", "jacobian")
METHODS = ("none", *BASELINES, "node_lens")  # what predicts the total effect
MEASURED = "measured"  # the total effect itself
NODE_BATCH_TOKENS = 8192  # tokens of one ablation pass: several nodes, each on its own copy
KL_BATCH_TOKENS = 512  # positions whose logits are compared at once (the clean ones ~100 MB)
ALPHA = 0.05

Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Node:
    """One attention head (``head`` its index) or the MLP (``head`` None) of block ``layer``."""

    layer: int
    head: int | None = None

    @property
    def kind(self) -> str:
        return "mlp" if self.head is None else "head"

    @property
    def name(self) -> str:
        return f"L{self.layer}.mlp" if self.head is None else f"L{self.layer}.h{self.head}"


def node_columns(node: Node) -> dict:
    """The columns naming a node in every table (``head`` -1 for an MLP)."""
    return {
        "layer": node.layer,
        "node": node.name,
        "kind": node.kind,
        "head": -1 if node.head is None else node.head,
    }


def block_nodes(adapter: Adapter, layer: int) -> list[Node]:
    """Every head of block ``layer``, then its MLP."""
    return [Node(layer, h) for h in range(adapter.n_heads)] + [Node(layer)]


@dataclass(frozen=True)
class NodeSettings:
    """Token budgets of the fits, the Jacobian and the evaluation, and the ridge grid.

    ``fit_sequences`` training sequences fit each node lens, the next ``ridge_sequences`` choose
    its ridge (then all of them refit it); the means are over every training sequence.
    ``ridges`` are relative to the mean eigenvalue of the write's covariance. The Jacobian
    (same position, :func:`write_jacobian`) averages over the first ``jacobian_positions``
    positions of ``jacobian_sequences`` training sequences, by forward differences of ``step``
    times the residual's RMS under ``jacobian_patterns`` random sign patterns (``seed``). KLs are
    read at every
    ``kl_stride``-th evaluated position (each costs the 49,152-token head once per method); the
    residual-space scores at every position.
    """

    k: int
    fit_sequences: int = 16
    ridge_sequences: int = 4
    eval_sequences: int = 16
    jacobian_sequences: int = 1
    jacobian_positions: int = 32
    jacobian_patterns: int = 1
    seed: int = 0
    ridges: tuple[float, ...] = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
    kl_stride: int = 4
    step: float = 1e-3
    chunk: int = 4

    @classmethod
    def from_params(
        cls, section: dict, d_model: int, chunk: int = 4, seed: int = 0
    ) -> NodeSettings:
        """From the config's ``nodes`` block (its ``layers`` aside: they choose the jobs)."""
        return cls(
            seed=seed,
            k=d_model // 2,
            fit_sequences=section["fit_sequences"],
            ridge_sequences=section["ridge_sequences"],
            eval_sequences=section["eval_sequences"],
            jacobian_sequences=section["jacobian_sequences"],
            jacobian_positions=section["jacobian_positions"],
            jacobian_patterns=section["jacobian_patterns"],
            ridges=tuple(section["ridges"]),
            kl_stride=section["kl_stride"],
            chunk=chunk,
        )


def _attention_write_module(adapter: Adapter, layer: int) -> torch.nn.Module:
    """The module whose output is the attention's write into the residual (its post-norm where a
    family has one)."""
    norm = adapter.attention_write_norm(layer)
    return norm if norm is not None else adapter.attention(layer)


def _from_position_one(delta: torch.Tensor) -> torch.Tensor:
    """``delta`` [B, T, d] with position 0 set to zero (a new tensor: the edit's is left as it
    is)."""
    return torch.cat([torch.zeros_like(delta[:, :1]), delta[:, 1:]], dim=1)


class BlockProbe:
    """Hooks on block ``layer``: record every head's input to ``W_O`` (scaled as in
    :func:`~lensspace.experiments.circuits.block_outputs`) and the MLP's write, and add an edit to
    the attention's or the MLP's write at positions 1.. (position 0 is never edited)."""

    def __init__(self, adapter: Adapter, layer: int):
        self.adapter, self.layer = adapter, layer
        self.w_o = adapter.head_out_weights(layer).detach().float()  # [H, e, d]
        self.heads: torch.Tensor | None = None  # [B, T, H, e]
        self.mlp: torch.Tensor | None = None  # [B, T, d]

    def head_writes(self) -> torch.Tensor:
        """Each head's write [B, T, H, d] of the last pass."""
        return torch.einsum("bthe,hed->bthd", self.heads, self.w_o)

    @contextmanager
    def attach(
        self,
        shape: tuple[int, int],
        attention_edit: Edit | None = None,
        mlp_edit: Edit | None = None,
    ) -> Iterator[BlockProbe]:
        """During the block's passes on ``shape`` = (batch, T): record, and add
        ``attention_edit(self)`` / ``mlp_edit(self)`` ([B, T, d]) to the writes."""
        adapter, layer, (batch, length) = self.adapter, self.layer, shape

        def record_heads(_module, args, out):
            scaled = args[0] / adapter.attention_write_scale(layer, out)
            self.heads = scaled.reshape(batch, length, adapter.n_heads, -1).float()

        def edit_attention(_module, _args, out):
            write = out[0] if isinstance(out, tuple) else out
            edited = write + _from_position_one(attention_edit(self)).to(write.dtype).reshape(
                write.shape
            )
            return (edited, *out[1:]) if isinstance(out, tuple) else edited

        def mlp_hook(_module, _args, out):
            self.mlp = out.reshape(batch, length, -1).float()  # OPT's MLP runs on [B * T, d]
            if mlp_edit is None:
                return None
            return out + _from_position_one(mlp_edit(self)).to(out.dtype).reshape(out.shape)

        handles = [adapter.attention_out(layer).register_forward_hook(record_heads)]
        if attention_edit is not None:
            module = _attention_write_module(adapter, layer)
            handles.append(module.register_forward_hook(edit_attention))
        handles.append(adapter.mlp(layer).register_forward_hook(mlp_hook))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@dataclass(frozen=True)
class Means:
    """Each head's mean scaled input to ``W_O`` [H, e] and the MLP's mean write [d], over training
    positions 1.."""

    heads: torch.Tensor
    mlp: torch.Tensor

    def write(self, probe: BlockProbe, node: Node) -> torch.Tensor:
        """The node's mean write [d]."""
        if node.head is None:
            return self.mlp
        return self.heads[node.head] @ probe.w_o[node.head]


def node_write(probe: BlockProbe, node: Node) -> torch.Tensor:
    """The node's write [B, T, d] in the last pass."""
    if node.head is None:
        return probe.mlp
    return probe.heads[:, :, node.head] @ probe.w_o[node.head]


def mean_ablation(nodes: list[Node], means: Means, copies: int) -> dict[str, Edit]:
    """The edits of :meth:`BlockProbe.attach` for a batch of ``len(nodes)`` replicas of
    ``copies`` sequences each: replica ``r`` has the write of ``nodes[r]`` replaced by its
    mean."""
    heads = [(r, node) for r, node in enumerate(nodes) if node.head is not None]
    mlps = [r for r, node in enumerate(nodes) if node.head is None]

    def rows(r: int) -> slice:
        return slice(r * copies, (r + 1) * copies)

    def attention(probe: BlockProbe) -> torch.Tensor:
        delta = probe.heads.new_zeros(*probe.heads.shape[:2], probe.w_o.shape[-1])
        for r, node in heads:
            change = means.heads[node.head] - probe.heads[rows(r), :, node.head]
            delta[rows(r)] = change @ probe.w_o[node.head]
        return delta

    def mlp(probe: BlockProbe) -> torch.Tensor:
        delta = torch.zeros_like(probe.mlp)
        for r in mlps:
            delta[rows(r)] = means.mlp - probe.mlp[rows(r)]
        return delta

    return {
        **({"attention_edit": attention} if heads else {}),
        **({"mlp_edit": mlp} if mlps else {}),
    }


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def block_means(runner: BlockRunner, layer: int, h: torch.Tensor, chunk: int) -> Means:
    """The mean writes of block ``layer``'s nodes over positions 1.. of residuals ``h``
    [n, T, d]."""
    probe = BlockProbe(runner.adapter, layer)
    heads, mlp, count = 0.0, 0.0, 0
    for part in _chunks(len(h), chunk):
        x = h[part]
        with probe.attach(x.shape[:2]):
            runner.call_block(layer, x)
        heads = heads + probe.heads[:, 1:].double().sum((0, 1))
        mlp = mlp + probe.mlp[:, 1:].double().sum((0, 1))
        count += x[:, 1:].shape[0] * x[:, 1:].shape[1]
    return Means((heads / count).float(), (mlp / count).float())


@dataclass
class Pass:
    """One set of sequences run from block ``layer``: the clean final residual, each node's write
    and, per node, the exact total effect ``dz`` (positions 1..)."""

    clean: torch.Tensor  # [n, T-1, d]
    writes: dict[Node, torch.Tensor]  # [n, T-1, d]
    effects: dict[Node, torch.Tensor]  # [n, T-1, d]


@torch.no_grad()
def total_effects(
    runner: BlockRunner,
    layer: int,
    h: torch.Tensor,
    nodes: list[Node],
    means: Means,
    chunk: int,
    desc: str = "",
) -> Pass:
    """Run residuals ``h`` [n, T, d] (entering block ``layer``) clean and with each node
    mean-ablated, through every later block; several nodes' ablations share a pass (about
    ``NODE_BATCH_TOKENS`` tokens), each on its own copy of the sequences."""
    probe = BlockProbe(runner.adapter, layer)
    clean, writes = [], {node: [] for node in nodes}
    effects = {node: [] for node in nodes}
    for part in tqdm(list(_chunks(len(h), chunk)), desc=desc, file=sys.stderr, mininterval=10):
        x = h[part]
        with probe.attach(x.shape[:2]):
            z = runner.run(x, start=layer)
        clean.append(z[:, 1:])
        for node in nodes:
            writes[node].append(node_write(probe, node)[:, 1:])
        per_pass = max(1, NODE_BATCH_TOKENS // x[..., 0].numel())
        for start in range(0, len(nodes), per_pass):
            group = nodes[start : start + per_pass]
            batch = x.repeat(len(group), 1, 1)
            with probe.attach(batch.shape[:2], **mean_ablation(group, means, len(x))):
                ablated = runner.run(batch, start=layer).reshape(len(group), *x.shape)
            for r, node in enumerate(group):
                effects[node].append(ablated[r, :, 1:] - z[:, 1:])
    return Pass(
        torch.cat(clean),
        {node: torch.cat(parts) for node, parts in writes.items()},
        {node: torch.cat(parts) for node, parts in effects.items()},
    )


@torch.no_grad()
def write_jacobian(
    runner: BlockRunner,
    layer: int,
    h: torch.Tensor,
    site: str,
    step: float,
    patterns: int = 1,
    seed: int = 0,
    rows: int = 64,
) -> torch.Tensor:
    """``J`` [d, d] (float64) = ``E_t[dz_t / dw_t]``: the final residual's response at each
    position 1.. of ``h`` [n, T, d] to a change of block ``layer``'s attention (``site``
    "attention") or MLP ("mlp") write at that same position, averaged over the positions.

    The ablation changes every position's write by a different amount, so the map applied to a
    token's own change is the same-position block; its cross-position terms average out. Each
    column comes from one pass in which every position's write is shifted by ``r_t * eps * e_i``
    with random signs ``r_t`` (``patterns`` seeded draws): ``E_t[r_t (z_t - z_t^clean)] / eps``
    keeps ``J_tt e_i``, and both the other positions' terms and the second-order term carry a
    sign of mean zero. ``eps`` is ``step`` times the residual's RMS; ``rows`` directions a pass.
    """
    adapter = runner.adapter
    n, length, d = h.shape
    eps = step * float(h[:, 1:].pow(2).mean().sqrt())
    clean = runner.run(h, start=layer)[:, 1:].double()
    out = torch.zeros(d, d, dtype=torch.float64)
    probe = BlockProbe(adapter, layer)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(patterns):
        signs = torch.randint(0, 2, (n, length), generator=gen).to(h.device, h.dtype) * 2 - 1
        for part in tqdm(
            list(_chunks(d, rows)), desc=f"jacobian {site}", file=sys.stderr, mininterval=10
        ):
            n_dir = part.stop - part.start
            batch = h.repeat(n_dir, 1, 1)
            shift = torch.zeros(n_dir, n, length, d, device=h.device)
            shift[torch.arange(n_dir), :, :, torch.arange(part.start, part.stop)] = eps * signs
            shift = shift.reshape(-1, length, d)
            edit = {f"{site}_edit": lambda _probe, shift=shift: shift}
            with probe.attach(batch.shape[:2], **edit):
                z = runner.run(batch, start=layer)
            change = z.reshape(n_dir, n, length, d)[:, :, 1:].double() - clean
            weighted = change * signs[:, 1:, None].double()
            out[:, part] += (weighted.mean((1, 2)) / eps).T.cpu()
    return out / patterns


@dataclass(frozen=True)
class AffineLens:
    """``dz ≈ (w - x_mean) @ weight + y_mean``: a node's lens from its write to its total
    effect, with the relative ridge that was chosen and the held-out R² at each."""

    weight: torch.Tensor  # [d, d]
    x_mean: torch.Tensor
    y_mean: torch.Tensor
    ridge: float
    check_r2: dict[float, float]

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return ((w.double() - self.x_mean) @ self.weight + self.y_mean).float()


class _RidgePath:
    """Centred least squares from ``x`` to ``y`` ([N, d], float64) at any ridge: the write's
    covariance is diagonalised once, so each ridge costs a product."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x_mean, self.y_mean = x.mean(0), y.mean(0)
        xc = x - self.x_mean
        values, self.vectors = torch.linalg.eigh(xc.T @ xc)
        self.values = values.clamp_min(0)
        self.projected = self.vectors.T @ (xc.T @ (y - self.y_mean))
        self.scale = float(self.values.mean())

    def weight(self, relative: float) -> torch.Tensor:
        lam = relative * self.scale + 1e-12
        return self.vectors @ (self.projected / (self.values + lam)[:, None])


def fit_node_lens(
    w_fit: torch.Tensor,
    dz_fit: torch.Tensor,
    w_check: torch.Tensor,
    dz_check: torch.Tensor,
    ridges: tuple[float, ...],
) -> AffineLens:
    """Least squares from writes to total effects ([N, d] each, float64 inside): the ridge with
    the best R² on the check tokens, then refitted on fit and check tokens together."""
    x, y = w_fit.double(), dz_fit.double()
    xc, yc = w_check.double(), dz_check.double()
    total = float((yc - yc.mean(0)).pow(2).sum())
    path = _RidgePath(x, y)
    scores = {}
    for relative in ridges:
        residual = yc - ((xc - path.x_mean) @ path.weight(relative) + path.y_mean)
        scores[relative] = 1 - float(residual.pow(2).sum()) / total if total > 0 else float("nan")
    best = max(ridges, key=lambda r: scores[r] if scores[r] == scores[r] else -float("inf"))
    full = _RidgePath(torch.cat([x, xc]), torch.cat([y, yc]))
    return AffineLens(full.weight(best), full.x_mean, full.y_mean, best, scores)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def predictions(
    adapter: Adapter,
    node: Node,
    dw: torch.Tensor,
    write: torch.Tensor,
    m: torch.Tensor,
    jacobian: torch.Tensor,
    lens: AffineLens,
) -> dict[str, torch.Tensor]:
    """Each method's predicted change of the final residual [..., d] from the write's change
    ``dw`` (mean - write) and, for the node's own lens, the write itself."""
    return {
        "none": torch.zeros_like(dw),
        "dla": dw,
        "layer_lens": dw @ m.to(dw.dtype).T,
        "jacobian": dw @ jacobian.to(dw.dtype).T,
        "node_lens": lens(write),
    }


def method_logits(
    adapter: Adapter, method: str, clean: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    """The output logits a method predicts: the clean final residual plus its change through the
    final norm, except ``dla``, whose change passes the norm with the clean scale frozen."""
    if method != "dla":
        return adapter.logits(clean + delta)
    centred = adapter.centre(clean.float())
    scale = adapter.norm_scale(centred)
    return adapter.logits_from_normalized(centred / scale + adapter.centre(delta.float()) / scale)


def _sums(values: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums [n] of per-token values [n, T]."""
    return values.double().sum(1).cpu()


@torch.no_grad()
def node_rows(
    adapter: Adapter,
    node: Node,
    clean: torch.Tensor,
    dz: torch.Tensor,
    preds: dict[str, torch.Tensor],
    q_out: torch.Tensor,
    q_int: torch.Tensor,
    chunk: int,
    kl_stride: int = 1,
) -> list[dict]:
    """Per-sequence sums for one node: for the measured effect and each method, the energy
    ``||delta||^2`` and its output/internal parts; per method the squared error against ``dz``
    and KL(ablated output || predicted output) summed over every ``kl_stride``-th position
    (``kl_tokens`` of them); ``sst`` the effect's squared deviation from its mean over every
    evaluated token."""
    mean = _flat(dz).double().mean(0)
    sst = _sums((dz.double() - mean).pow(2).sum(-1))
    n, length = dz.shape[:2]

    q_out, q_int = q_out.to(dz.dtype), q_int.to(dz.dtype)

    def energies(delta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "energy": _sums(delta.double().pow(2).sum(-1)),
            "out_energy": _sums((delta @ q_out).double().pow(2).sum(-1)),
            "int_energy": _sums((delta @ q_int).double().pow(2).sum(-1)),
        }

    kls = {method: [] for method in preds}
    read = slice(None, None, kl_stride)
    kl_tokens = len(range(length)[read])
    for part in _chunks(n, max(chunk, KL_BATCH_TOKENS // kl_tokens)):
        z, effect = clean[part, read], dz[part, read]
        reference = KLReference.from_logits(adapter.logits(z + effect))
        for method, delta in preds.items():
            q_logits = (
                adapter.logits(z)
                if method == "none"
                else method_logits(adapter, method, z, delta[part, read])
            )
            kls[method].append(reference.kl(q_logits))
    zeros = torch.zeros(n, dtype=torch.float64)
    sums = {MEASURED: {"sse": zeros, "sse_centred": zeros, "kl": zeros, **energies(dz)}}
    for method, delta in preds.items():
        error = dz.double() - delta.double()
        sums[method] = {
            "sse": _sums(error.pow(2).sum(-1)),
            "sse_centred": _sums((error - _flat(error).mean(0)).pow(2).sum(-1)),
            "kl": _sums(torch.cat(kls[method])),
            **energies(delta),
        }
    return [
        {
            **node_columns(node),
            "method": method,
            "sequence": s,
            "n_tokens": length,
            "kl_tokens": kl_tokens,
            "sst": float(sst[s]),
            **{key: float(v[s]) for key, v in values.items()},
        }
        for method, values in sums.items()
        for s in range(n)
    ]


@torch.no_grad()
def run_layer(
    runner: BlockRunner,
    lens: TunedLens,
    cache: ActivationCache,
    basis: torch.Tensor,
    layer: int,
    settings: NodeSettings,
) -> tuple[list[dict], list[dict]]:
    """Every node of block ``layer``: (per-sequence sums of :func:`node_rows`, one row per node
    describing its fit)."""
    adapter = runner.adapter
    train = cache.load(layer, "train")
    n_fit, n_check = settings.fit_sequences, settings.ridge_sequences
    if n_fit + n_check > len(train):
        raise LensspaceError(
            f"nodes.fit_sequences + nodes.ridge_sequences = {n_fit + n_check}, but the run has "
            f"{len(train)} training sequences: lower them or raise data.train_sequences"
        )
    nodes = block_nodes(adapter, layer)
    means = block_means(runner, layer, train, settings.chunk)
    jac_h = train[: settings.jacobian_sequences, : settings.jacobian_positions]
    jacobians = {
        site: write_jacobian(
            runner,
            layer,
            jac_h,
            site,
            settings.step,
            settings.jacobian_patterns,
            settings.seed + layer,
        )
        for site in ("attention", "mlp")
    }
    fit = total_effects(
        runner, layer, train[: n_fit + n_check], nodes, means, settings.chunk, desc=f"fit {layer}"
    )
    held = cache.load(layer, "eval")[: settings.eval_sequences]
    evaluated = total_effects(
        runner, layer, held, nodes, means, settings.chunk, desc=f"eval {layer}"
    )
    m = adapter.to_device(write_maps(adapter, lens)[layer])
    jacobians = {site: adapter.to_device(j) for site, j in jacobians.items()}
    q_out = adapter.to_device(select(basis, "output", settings.k).double())
    q_int = adapter.to_device(select(basis, "internal", settings.k).double())
    probe = BlockProbe(adapter, layer)
    rows, fits = [], []
    for node in nodes:
        w_all, dz_all = fit.writes[node], fit.effects[node]
        lens_fit = fit_node_lens(
            _flat(w_all[:n_fit]),
            _flat(dz_all[:n_fit]),
            _flat(w_all[n_fit:]),
            _flat(dz_all[n_fit:]),
            settings.ridges,
        )
        write = evaluated.writes[node]
        dw = means.write(probe, node) - write
        jacobian = jacobians["mlp" if node.head is None else "attention"]
        preds = predictions(adapter, node, dw, write, m, jacobian, lens_fit)
        rows += node_rows(
            adapter,
            node,
            evaluated.clean,
            evaluated.effects[node],
            preds,
            q_out,
            q_int,
            settings.chunk,
            settings.kl_stride,
        )
        fits.append(
            {
                **node_columns(node),
                "ridge": lens_fit.ridge,
                "check_r2": lens_fit.check_r2[lens_fit.ridge],
                "write_rms": float(write.pow(2).sum(-1).mean().sqrt()),
                "fit_tokens": int(w_all.shape[0] * w_all.shape[1]),
                "jacobian_tokens": int(jac_h[:, 1:].shape[0] * jac_h[:, 1:].shape[1]),
            }
        )
    return rows, fits


# ----------------------------------------------------------------------------------------------
# Scores across the run's nodes, from the layer jobs' per-sequence sums.


def _totals(sums: pd.DataFrame) -> pd.DataFrame:
    keys = ["layer", "node", "kind", "head", "method"]
    return (
        sums.groupby(keys, sort=False)[
            [
                "n_tokens",
                "kl_tokens",
                "sst",
                "sse",
                "sse_centred",
                "kl",
                "energy",
                "out_energy",
                "int_energy",
            ]
        ]
        .sum()
        .reset_index()
    )


def _per_sequence(sums: pd.DataFrame, node: str, method: str, column: str) -> torch.Tensor:
    rows = sums[(sums["node"] == node) & (sums["method"] == method)].sort_values("sequence")
    return torch.tensor(rows[column].to_numpy(), dtype=torch.float64)


def _percentile(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(lo), float(hi)


def r2_interval(sse: torch.Tensor, sst: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """95% bootstrap-t interval over sequences of ``1 - sum(sse) / sum(sst)`` (``counts`` from
    :func:`~lensspace.stats.resample_counts`; see :func:`~lensspace.stats.ratio_interval`)."""
    lo, hi = ratio_interval(sse, sst, counts)
    return 1 - hi, 1 - lo


def score_rows(sums: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Per node and method (and the measured effect): R² with its interval, R² once the method's
    mean error over the held-out tokens is removed (``r2_offset_free``: what an affine lens's
    intercept adds, and a baseline lacks), KL with its interval, the effect's RMS size and its
    output / internal shares (of the change the method predicts)."""
    totals = _totals(sums)
    n_seq = int(sums["sequence"].nunique())
    counts = resample_counts(n_seq, n_boot, seed)
    rows = []
    for row in totals.itertuples(index=False):
        sse = _per_sequence(sums, row.node, row.method, "sse")
        sst = _per_sequence(sums, row.node, row.method, "sst")
        centred = _per_sequence(sums, row.node, row.method, "sse_centred")
        r2, r2c = (
            (1 - row.sse / row.sst, 1 - row.sse_centred / row.sst)
            if row.sst > 0
            else (float("nan"),) * 2
        )
        lo, hi = r2_interval(sse, sst, counts) if row.sst > 0 else (float("nan"),) * 2
        clo, chi = r2_interval(centred, sst, counts) if row.sst > 0 else (float("nan"),) * 2
        kl_seq = _per_sequence(sums, row.node, row.method, "kl") / (row.kl_tokens / n_seq)
        kl = bootstrap_mean(kl_seq, n_boot=n_boot, seed=seed)
        energy = row.energy if row.energy > 0 else float("nan")
        rows.append(
            {
                "layer": row.layer,
                "node": row.node,
                "kind": row.kind,
                "head": row.head,
                "method": row.method,
                "r2": r2,
                "r2_lo": lo,
                "r2_hi": hi,
                "r2_offset_free": r2c,
                "r2_offset_free_lo": clo,
                "r2_offset_free_hi": chi,
                "kl": kl.mean,
                "kl_lo": kl.lo,
                "kl_hi": kl.hi,
                "effect_rms": (row.energy / row.n_tokens) ** 0.5,
                "output_share": row.out_energy / energy,
                "internal_share": row.int_energy / energy,
                "n_tokens": row.n_tokens,
                "kl_tokens": row.kl_tokens,
                "n_sequences": n_seq,
            }
        )
    return pd.DataFrame(rows)


def comparison_rows(
    sums: pd.DataFrame, n_boot: int, seed: int, margin: float = 0.01
) -> pd.DataFrame:
    """The node lens against each baseline, per node: the gain in R² (baseline's squared error
    minus the lens's, over the effect's total) with its bootstrap-t interval, and the exact sign
    test over sequences of the per-sequence error differences, Holm-adjusted over every (node,
    baseline) pair. Verdict: ``node lens better`` / ``baseline better`` where the test rejects,
    the majority of sequences and the gain agree in direction and the gain is at least
    ``margin``; ``equivalent`` where the gain's interval lies inside ``(-margin, margin)``;
    otherwise ``not separable``."""
    n_seq = int(sums["sequence"].nunique())
    counts = resample_counts(n_seq, n_boot, seed)
    rows = []
    nodes = sums[["layer", "node", "kind", "head"]].drop_duplicates()
    for node in nodes.itertuples(index=False):
        sst = _per_sequence(sums, node.node, MEASURED, "sst")
        lens = _per_sequence(sums, node.node, "node_lens", "sse")
        for baseline in BASELINES:
            gain = _per_sequence(sums, node.node, baseline, "sse") - lens
            lo, hi = ratio_interval(gain, sst, counts)
            rows.append(
                {
                    "layer": node.layer,
                    "node": node.node,
                    "kind": node.kind,
                    "head": node.head,
                    "baseline": baseline,
                    "r2_gain": float(gain.sum() / sst.sum()),
                    "gain_lo": lo,
                    "gain_hi": hi,
                    "n_better": int((gain > 0).sum()),
                    "n_worse": int((gain < 0).sum()),
                    "p_value": sign_test_p(gain),
                    "n_sequences": n_seq,
                    "margin": margin,
                }
            )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["p_adjusted"] = adjust(table["p_value"].tolist(), CORRECTION)
    significant = table["p_adjusted"] < ALPHA
    better = significant & (table["n_better"] > table["n_worse"]) & (table["r2_gain"] >= margin)
    worse = significant & (table["n_better"] < table["n_worse"]) & (table["r2_gain"] <= -margin)
    table["verdict"] = "not separable"
    table.loc[(table["gain_lo"] > -margin) & (table["gain_hi"] < margin), "verdict"] = "equivalent"
    table.loc[better, "verdict"] = "node lens better"
    table.loc[worse, "verdict"] = "baseline better"
    return table


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last axis (ties: by position, continuous values have none)."""
    return x.argsort(-1).argsort(-1).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation along the last axis."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def rank_rows(sums: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    """Per method: Spearman's correlation across nodes between the predicted and the measured
    effect sizes (RMS of the final residual's change), with a 95% percentile bootstrap interval
    over sequences (one resample for every node, as they share the held-out sequences)."""
    n_seq = int(sums["sequence"].nunique())
    counts = resample_counts(n_seq, n_boot, seed)
    nodes = list(dict.fromkeys(sums["node"]))
    if len(nodes) < 3:
        return pd.DataFrame()

    def energies(method: str) -> torch.Tensor:
        return torch.stack([_per_sequence(sums, n, method, "energy") for n in nodes])  # [N, n]

    measured = energies(MEASURED)
    rows = []
    for method in METHODS[1:]:
        predicted = energies(method)
        rho = float(spearman(predicted.sum(1), measured.sum(1)))
        boot = spearman((counts @ predicted.T), (counts @ measured.T))
        lo, hi = _percentile(boot)
        rows.append(
            {
                "method": method,
                "spearman": rho,
                "spearman_lo": lo,
                "spearman_hi": hi,
                "n_nodes": len(nodes),
                "n_sequences": n_seq,
            }
        )
    return pd.DataFrame(rows)


SHARE_SOURCES = (MEASURED, "node_lens", "layer_lens", "dla")


def induction_rows(
    scores: pd.DataFrame, heads: pd.DataFrame, n_permutations: int, n_boot: int, seed: int
) -> pd.DataFrame:
    """The induction-head test of :func:`~lensspace.experiments.circuits.layer_permutation_test`
    on the measured heads' output shares, once per source of the share: the measured total effect,
    the node lens, the layer lens (the circuit-end geometry) and the write itself."""
    measured = scores[scores["kind"] == "head"]
    layers = sorted(measured["layer"].unique())
    flags = heads.set_index(["layer", "head"])["is_induction"].astype(bool)
    rows = []
    for source in SHARE_SOURCES:
        part = measured[measured["method"] == source].set_index(["layer", "head"])
        n_heads = int(part.index.get_level_values("head").max()) + 1 if len(part) else 0
        values = torch.zeros(len(layers), n_heads, dtype=torch.float64)
        is_induction = torch.zeros(len(layers), n_heads, dtype=torch.bool)
        for i, layer in enumerate(layers):
            for head in range(n_heads):
                values[i, head] = float(part.loc[(layer, head), "output_share"])
                is_induction[i, head] = bool(flags.get((layer, head), False))
        test = layer_permutation_test(values, is_induction, n_permutations, n_boot, seed)
        rows.append({"share": source, "layers": " ".join(map(str, layers)), **test})
    return pd.DataFrame(rows)
