"""Circuit ends down to single MLP neurons, and a causal test of the entropy-neuron account.

Neuron ``j`` of block ``l`` writes ``a_j * w_j`` into residual ``l + 1`` (``w_j`` a row of
:meth:`~lensspace.adapter.Adapter.neuron_out_weights`). In lens space that write is
``M w_j`` with ``M`` the translator map of :func:`~lensspace.experiments.circuits.write_maps`
(``I + A_{l+1}``; ``I`` for the last block). Per neuron: ``||w||``, the shares
``||Q^T M w||^2 / ||M w||^2`` of the output (top-k) and internal (bottom-k) subspaces, and its
direct effect on the logits through the lens: the spread over the vocabulary of
``W_U (g * center(M w))``, the logit change per unit of the normalised input (the final norm's
scale held fixed; a constant added to every logit changes nothing, so the spread is what can
re-rank), and the share of ``center(M w)`` in the bottom ``null_k`` directions of the centred,
gain-folded unembedding (its effective null space, the geometry Stolfo et al. 2024 use).

Entropy neurons (Stolfo et al. 2024) write large vectors the unembedding almost ignores: they
act through the final norm's scale, so they move the output's entropy but not its ranking.
Candidates here are the largest-norm neurons whose internal share passes a threshold; each is
mean-ablated (its activation replaced by its training mean at every position but the first)
and compared, on the same held-out sequences, with random neurons of the same layer and
nearly the same norm (drawn without replacement among the ``match_pool`` nearest, no neuron
twice in one experiment). A verdict "candidate > matched" on a metric needs the paired test's
Holm-adjusted p-value (over every comparison of the experiment) below 0.05 and the candidate's
mean beyond every matched draw's mean, as for the random subspaces of the other experiments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd
import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.divergences import KLReference, OutputStats
from lensspace.errors import LensspaceError
from lensspace.experiments.circuits import write_maps
from lensspace.robustness import ALPHA, CORRECTION, HOLDS, verdict
from lensspace.runner import BlockRunner
from lensspace.stats import (
    adjust,
    bootstrap_intervals,
    bootstrap_mean,
    draw_spread,
    matched_permutation_p,
    paired_difference,
    resample_counts,
)
from lensspace.subspaces import select

# Per-token effects of an ablation; the signed entropy change may be negative.
METRICS = ("abs_d_entropy", "d_entropy", "kl", "top1_change", "d_log_scale")
NONNEGATIVE = {"abs_d_entropy", "kl", "top1_change", "d_log_scale"}
# Compared as paired candidate-minus-random differences.
COMPARED = ("abs_d_entropy", "kl", "top1_change")
# The basis whose bottom directions are the effective null space.
NULL_SPACE = "unembed_centered"
# Per-sequence shares of flipped tokens are discrete and often tied: a bootstrap-t interval
# degenerates on them (resamples with no spread), so their intervals are BCa.
DISCRETE = {"top1_change"}


@dataclass(frozen=True)
class NeuronSettings:
    """Which neurons are candidates and how the causal test is sized.

    ``candidate_layers``: the blocks whose neurons may be candidates; ``match_pool``: a random
    control neuron is drawn from the non-candidate neurons of the same layer nearest in norm;
    ``null_k``: the size of the effective null space of the ``null_fraction`` column;
    ``top1_margin``: how much more often than the matched neurons a candidate may change the
    top-1 token (share of positions, upper end of the interval) and still leave the ranking alone.
    """

    k: int
    candidate_layers: tuple[int, ...]
    null_k: int = 1
    top1_margin: float = 0.01
    n_candidates: int = 8
    min_internal_share: float = 0.9
    random_draws: int = 4
    match_pool: int = 16
    eval_sequences: int = 8
    mean_sequences: int = 16
    n_boot: int = 1000
    test_resamples: int = 20000
    seed: int = 0


def null_space(adapter: Adapter, k: int) -> torch.Tensor:
    """[d, k'] orthonormal: the directions of the normalised residual the centred logits respond to
    least, the bottom right singular vectors of ``(W_U - mean) diag(g)`` among those the final
    norm can output (LayerNorm's output has zero mean: its all-ones direction, read by no logit
    difference, is left out). ``k' = k``, or the whole exact kernel where that is larger (OPT-350m's
    ``project_out`` leaves one), so that the subspace never depends on the SVD's arbitrary
    choice."""
    w_u = adapter.unembedding.detach().double().cpu()
    folded = adapter.centre((w_u - w_u.mean(0)) * adapter.norm_gain.detach().double().cpu())
    # the right singular vectors only: a full U would be [vocab, vocab] (19 GB for SmolLM2)
    _, s, vh = torch.linalg.svd(folded, full_matrices=folded.shape[0] < folded.shape[1])
    s = torch.cat([s, s.new_zeros(len(vh) - len(s))])
    ones = torch.ones(len(vh), dtype=torch.float64)
    removed = ones - adapter.centre(ones)  # all-ones under LayerNorm, zero otherwise
    output = (vh @ removed).abs() < 0.5 * removed.norm() if float(removed.norm()) > 0 else s == s
    vh, s = vh[output], s[output]
    kernel = int((s <= s[0] * 1e-5).sum())  # zero up to the float32 rounding of the stored weights
    return vh[len(vh) - max(k, kernel) :].T.contiguous()


def neuron_geometry(
    adapter: Adapter, lens: TunedLens, basis: torch.Tensor, k: int, null_k: int | None = None
) -> pd.DataFrame:
    """One row per MLP neuron: norm, lens-space norm, output / internal share, logit effect, and
    (with ``null_k``) the share of the centred write in the :func:`null_space` of that size."""
    q_out = select(basis, "output", k).double().cpu()
    q_int = select(basis, "internal", k).double().cpu()
    q_null = null_space(adapter, null_k) if null_k else None
    w_u = adapter.unembedding.detach().double().cpu()
    centred = w_u - w_u.mean(0)
    logit_cov = (
        centred.T @ centred / (len(w_u) - 1)
    )  # spread over the vocabulary of W_U x is sqrt(x^T C x)
    gain = adapter.norm_gain.detach().double().cpu()
    frames = []
    for layer, m in enumerate(write_maps(adapter, lens)):
        w = adapter.neuron_out_weights(layer).detach().double().cpu()  # [n, d]
        lens_w = w @ m.T
        total = lens_w.square().sum(1)
        normalised = adapter.centre(lens_w)
        x = normalised * gain
        spread = ((x @ logit_cov) * x).sum(1).clamp_min(0).sqrt()
        lens_norm = total.sqrt()
        frame = pd.DataFrame(
            {
                "layer": layer,
                "neuron": range(len(w)),
                "norm": w.norm(dim=1).numpy(),
                "lens_norm": lens_norm.numpy(),
                "output_fraction": ((lens_w @ q_out).square().sum(1) / total).numpy(),
                "internal_fraction": ((lens_w @ q_int).square().sum(1) / total).numpy(),
                "logit_effect": spread.numpy(),
                "logit_effect_rel": (spread / lens_norm.clamp_min(1e-30)).numpy(),
            }
        )
        if q_null is not None:
            frame["null_fraction"] = (
                (normalised @ q_null).square().sum(1) / normalised.square().sum(1).clamp_min(1e-300)
            ).numpy()
            frame["null_k"] = q_null.shape[1]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def by_position(a: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The MLP activations as a [batch, position, neuron] view (OPT runs its MLP on flattened
    tokens)."""
    return a.view(-1, seq_len, a.shape[-1])


@torch.no_grad()
def activation_stats(
    adapter: Adapter, ids: torch.Tensor, chunk: int = 4
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: every neuron's mean and root-mean-square activation over positions 1.. of
    ``ids``."""
    sums: dict[int, torch.Tensor] = {}
    squares: dict[int, torch.Tensor] = {}

    seq_len = ids.shape[1]

    def hook_for(layer: int):
        def hook(_module, args):
            a = by_position(args[0], seq_len)[:, 1:].double()
            sums[layer] = sums.get(layer, 0) + a.sum((0, 1)).cpu()
            squares[layer] = squares.get(layer, 0) + a.square().sum((0, 1)).cpu()

        return hook

    with ExitStack() as stack:
        for layer in range(adapter.n_layers):
            handle = adapter.mlp_out(layer).register_forward_pre_hook(hook_for(layer))
            stack.callback(handle.remove)
        for start in range(0, len(ids), chunk):
            adapter.model(ids[start : start + chunk].long(), use_cache=False)
    n = ids[:, 1:].numel()
    return (
        [sums[i] / n for i in range(adapter.n_layers)],
        [(squares[i] / n).sqrt() for i in range(adapter.n_layers)],
    )


def pick_candidates(table: pd.DataFrame, settings: NeuronSettings) -> pd.DataFrame:
    """The ``n_candidates`` largest-norm neurons of the candidate layers above the share
    threshold."""
    pool = table[
        table["layer"].isin(settings.candidate_layers)
        & (table["internal_fraction"] >= settings.min_internal_share)
    ]
    return pool.sort_values(["norm", "layer", "neuron"], ascending=[False, True, True]).head(
        settings.n_candidates
    )


def matched_neurons(
    table: pd.DataFrame, candidates: pd.DataFrame, settings: NeuronSettings
) -> list[list[int]]:
    """For each random draw, one control neuron per candidate: same layer, among the ``match_pool``
    non-candidates nearest in norm, drawn without replacement (seeded); no neuron serves two
    candidates, so each draw's set for the joint test has as many distinct neurons as candidates."""
    if settings.match_pool < settings.random_draws:
        raise LensspaceError(
            f"neurons.match_pool ({settings.match_pool}) must be at least random_draws "
            f"({settings.random_draws}): each draw needs its own matched neuron"
        )
    gen = torch.Generator().manual_seed(settings.seed)
    taken = set(zip(candidates["layer"], candidates["neuron"]))
    draws: list[list[int]] = [[] for _ in range(settings.random_draws)]
    for layer, norm in zip(candidates["layer"], candidates["norm"]):
        others = table[
            (table["layer"] == layer)
            & ~table["neuron"].map(lambda j, layer=layer: (layer, j) in taken)
        ]
        if len(others) < settings.match_pool:
            raise LensspaceError(
                f"neurons: layer {layer} has {len(others)} neurons left to match a candidate "
                f"with, neurons.match_pool asks for {settings.match_pool}: lower it or "
                "neurons.n_candidates"
            )
        nearest = others.iloc[
            (others["norm"] - norm).abs().argsort(kind="stable")[: settings.match_pool]
        ]
        picks = torch.randperm(len(nearest), generator=gen)[: settings.random_draws]
        for draw, pick in enumerate(picks.tolist()):
            neuron = int(nearest["neuron"].iloc[pick])
            draws[draw].append(neuron)
            taken.add((layer, neuron))
    return draws


class _Clean(NamedTuple):
    """One chunk's unablated output: its distribution, that distribution's own entropy and
    top-1 token (``output``), and the log of the final norm's scale."""

    reference: KLReference
    output: OutputStats
    log_scale: torch.Tensor


def _log_scale(adapter: Adapter, z: torch.Tensor) -> torch.Tensor:
    """Log of the final norm's per-token scale (root mean square of the centred residual)."""
    return adapter.centre(z.float()).square().mean(-1).add(adapter.norm_eps).log().mul(0.5)


class NeuronAblation:
    """Mean-ablates sets of neurons (resuming from the cached residual) and measures the output.

    Each effect is per held-out sequence (mean over positions 1..): ``abs_d_entropy`` /
    ``d_entropy`` = (absolute / signed) change of the output's entropy, ``kl`` =
    KL(p_model || p_ablated), ``top1_change`` = share of positions whose top-1 token changes,
    ``d_log_scale`` = absolute change of the log of the final norm's scale.
    """

    def __init__(
        self,
        runner: BlockRunner,
        cache: ActivationCache,
        means: list[torch.Tensor],
        n_sequences: int,
        chunk: int = 4,
    ):
        self.runner, self.cache, self.means, self.chunk = runner, cache, means, chunk
        self.n_sequences = n_sequences
        self._clean: dict[int, list[_Clean]] = {}

    def _residual(self, layer: int) -> torch.Tensor:
        return self.cache.load(layer, "eval")[: self.n_sequences]

    def _clean_outputs(self, start: int) -> list[_Clean]:
        """Per chunk: the unablated run's distribution (its entropy and top-1 token) and final
        residual, on the same path as the ablated runs."""
        if start not in self._clean:
            h = self._residual(start)
            outs = []
            for i in range(0, len(h), self.chunk):
                z = self.runner.run(h[i : i + self.chunk], start=start)[:, 1:]
                logits = self.runner.adapter.logits(z)
                reference = KLReference.from_logits(logits)
                # a copy: the compiled comparison is specialised on inputs that do not alias
                outs.append(
                    _Clean(
                        reference,
                        reference.compare(logits.clone()),
                        _log_scale(self.runner.adapter, z),
                    )
                )
            self._clean[start] = outs
        return self._clean[start]

    @torch.no_grad()
    def effects(self, neurons: Mapping[int, list[int]]) -> dict[str, torch.Tensor]:
        """Per-sequence effects [n_seq] of mean-ablating ``neurons`` ({layer: [neuron, ...]})
        together."""
        adapter = self.runner.adapter
        start = min(neurons)
        h = self._residual(start)
        reference = self._clean_outputs(start)  # before the hooks go on
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in METRICS}

        def hook_for(layer: int):
            if len(set(neurons[layer])) != len(neurons[layer]):
                raise LensspaceError(
                    f"neurons: layer {layer}'s set names a neuron twice: {neurons[layer]}"
                )
            idx = torch.tensor(sorted(neurons[layer]), dtype=torch.long)
            value = self.means[layer][idx]

            def hook(_module, args):
                a = args[0].clone()
                by_position(a, h.shape[1])[:, 1:, idx.to(a.device)] = value.to(a.device, a.dtype)
                return (a, *args[1:])

            return hook

        with ExitStack() as stack:
            for layer in neurons:
                handle = adapter.mlp_out(layer).register_forward_pre_hook(hook_for(layer))
                stack.callback(handle.remove)
            for clean, i in zip(reference, range(0, len(h), self.chunk)):
                z = self.runner.run(h[i : i + self.chunk], start=start)[:, 1:]
                out = clean.reference.compare(adapter.logits(z))
                d_entropy = out.entropy - clean.output.entropy
                per_token = {
                    "abs_d_entropy": d_entropy.abs(),
                    "d_entropy": d_entropy,
                    "kl": out.kl,
                    "top1_change": (out.top1 != clean.output.top1).double(),
                    "d_log_scale": (_log_scale(adapter, z) - clean.log_scale).abs(),
                }
                for name, values in per_token.items():
                    parts[name].append(values.double().mean(1).cpu())
        return {name: torch.cat(values) for name, values in parts.items()}


def _estimate(prefix: str, name: str, values: torch.Tensor, settings: NeuronSettings) -> dict:
    floor = 0.0 if name in NONNEGATIVE else None
    method = "bca" if name in DISCRETE else "studentized"
    if values.dim() == 2:  # [draws, n_seq]: the draws' mean, with their spread
        spread = draw_spread(values, settings.n_boot, settings.seed, method=method)
        est = spread.estimate
        extra = {
            f"{prefix}{name}_draw_min": spread.draw_min,
            f"{prefix}{name}_draw_max": spread.draw_max,
        }
        lo = max(est.lo, floor) if floor is not None else est.lo
    else:
        est = bootstrap_mean(values, settings.n_boot, settings.seed, method=method, floor=floor)
        extra, lo = {}, est.lo
    return {
        f"{prefix}{name}": est.mean,
        f"{prefix}{name}_lo": lo,
        f"{prefix}{name}_hi": est.hi,
        **extra,
    }


def _paired(name: str, a: torch.Tensor, draws: torch.Tensor, settings: NeuronSettings) -> dict:
    """Mean of ``a`` minus the matched draws' mean over sequences, its interval (bootstrap-t; BCa
    for discrete metrics) and the matched permutation p-value: few, heavy-tailed or discrete
    per-sequence effects, where the bootstrap-t test is liberal at Holm's levels
    (``validation/test_size.py``)."""
    b = draws.mean(0)
    comp = paired_difference(a, b, settings.test_resamples, settings.seed)
    lo, hi = comp.lo, comp.hi
    if name in DISCRETE:
        bca = bootstrap_intervals(
            (a - b).double().unsqueeze(0), settings.n_boot, settings.seed, method="bca"
        )
        lo, hi = float(bca[0][0]), float(bca[1][0])
    return {
        f"diff_{name}": comp.diff,
        f"diff_{name}_lo": lo,
        f"diff_{name}_hi": hi,
        f"p_{name}": matched_permutation_p(a, draws, settings.test_resamples, settings.seed),
    }


def _entropy_per_kl(
    h: torch.Tensor, kl: torch.Tensor, settings: NeuronSettings
) -> tuple[float, float]:
    """95% percentile bootstrap interval over sequences of mean |dH| / mean KL (a ratio of
    means)."""
    counts = resample_counts(len(h), settings.n_boot, settings.seed).double()
    ratio = (counts @ h.double()) / (counts @ kl.double()).clamp_min(1e-300)
    lo, hi = torch.quantile(ratio, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def compare(
    candidate: dict[str, torch.Tensor],
    random: list[dict[str, torch.Tensor]],
    settings: NeuronSettings,
) -> dict:
    """Every metric for the candidate(s) and the matched random draws, and their paired differences
    (p-values not yet adjusted: :func:`add_verdicts` does that over the experiment)."""
    row: dict = {}
    for name in METRICS:
        row.update(_estimate("", name, candidate[name], settings))
    for name in METRICS:
        row.update(_estimate("random_", name, torch.stack([r[name] for r in random]), settings))
    for name in COMPARED:
        row.update(_paired(name, candidate[name], torch.stack([r[name] for r in random]), settings))
    row["entropy_per_kl"] = row["abs_d_entropy"] / row["kl"] if row["kl"] > 0 else float("nan")
    row["entropy_per_kl_lo"], row["entropy_per_kl_hi"] = (
        _entropy_per_kl(candidate["abs_d_entropy"], candidate["kl"], settings)
        if row["kl"] > 0
        else (float("nan"), float("nan"))
    )
    row["random_entropy_per_kl"] = (
        row["random_abs_d_entropy"] / row["random_kl"] if row["random_kl"] > 0 else float("nan")
    )
    per_draw = [
        float(r["abs_d_entropy"].mean() / r["kl"].mean())
        for r in random
        if float(r["kl"].mean()) > 0
    ]
    row["random_entropy_per_kl_draw_max"] = max(per_draw) if per_draw else float("nan")
    return row


def add_verdicts(rows: list[dict], top1_margin: float) -> None:
    """Holm-adjust the paired p-values of every row and metric together (one family: the
    experiment), then each metric's verdict against the matched draws, and whether the row fits
    the entropy-neuron account: |dH| above the matched neurons', the top-1 token changed at most
    ``top1_margin`` of positions more often than theirs (the upper end of the paired interval:
    evidence the ranking is left alone, not the mere absence of a verdict), and |dH| / KL with
    its interval above every matched draw's."""
    keys = [(i, name) for i in range(len(rows)) for name in COMPARED]
    adjusted = adjust([rows[i][f"p_{name}"] for i, name in keys], CORRECTION)
    for (i, name), p in zip(keys, adjusted):
        row = rows[i]
        row[f"p_{name}_adjusted"] = p
        row[f"verdict_{name}"] = verdict(
            row[f"diff_{name}"],
            p,
            row[name],
            row[f"random_{name}_draw_min"],
            row[f"random_{name}_draw_max"],
        )
    for row in rows:
        row["entropy_account"] = bool(
            row["verdict_abs_d_entropy"] == HOLDS
            and row["diff_top1_change_hi"] <= top1_margin
            and row["entropy_per_kl_lo"] > row["random_entropy_per_kl_draw_max"]
        )


def causal_test(
    ablation: NeuronAblation,
    table: pd.DataFrame,
    candidates: pd.DataFrame,
    settings: NeuronSettings,
) -> tuple[list[dict], list[dict]]:
    """Rows of candidates.tsv (each candidate alone) and joint.tsv (all candidates together)."""
    draws = matched_neurons(table, candidates, settings)
    # resolution: the smallest permutation p-value stays a quarter of Holm's first threshold
    family = len(COMPARED) * (len(candidates) + 1)
    settings = dataclasses.replace(
        settings, test_resamples=max(settings.test_resamples, math.ceil(8 * family / ALPHA))
    )
    # a relabelling test cannot tell apart more than its (m + 1)^n labellings: 1 / (m + 1)^n is
    # about the smallest p-value it can give (the observed labelling is one of them)
    floor = float(settings.random_draws + 1) ** -ablation.n_sequences
    if floor > ALPHA / family:
        print(
            f"warning: at {ablation.n_sequences} sequences and {settings.random_draws} draws the "
            "smallest "
            f"p-value, about {floor:.2g}, is above Holm's first threshold {ALPHA / family:.2g}: no "
            "neuron "
            "verdict can hold; raise neurons.eval_sequences",
            flush=True,
        )
    n_tokens = ablation.n_sequences * (ablation.cache.load(0, "eval").shape[1] - 1)
    base = {
        "n_draws": settings.random_draws,
        "n_sequences": ablation.n_sequences,
        "n_tokens": n_tokens,
    }
    norms = table.set_index(["layer", "neuron"])["norm"]
    rows = []
    for index, (layer, neuron) in enumerate(zip(candidates["layer"], candidates["neuron"])):
        mine = ablation.effects({int(layer): [int(neuron)]})
        random = [ablation.effects({int(layer): [draw[index]]}) for draw in draws]
        print(
            f"candidate {index + 1}/{len(candidates)}: {int(layer)}.{int(neuron)} ablated with "
            f"{len(draws)} matched random neurons",
            flush=True,
        )
        ratio = (
            sum(norms[(layer, draw[index])] for draw in draws) / len(draws) / norms[(layer, neuron)]
        )
        rows.append(
            {
                "layer": int(layer),
                "neuron": int(neuron),
                "rank": index + 1,
                "matched": ",".join(str(draw[index]) for draw in draws),
                "matched_norm_ratio": float(ratio),
                **compare(mine, random, settings),
                **base,
            }
        )
    if candidates.empty:
        return rows, []

    def grouped(neurons: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, neuron in zip(candidates["layer"], neurons):
            out.setdefault(int(layer), []).append(int(neuron))
        return out

    mine = ablation.effects(grouped(list(candidates["neuron"])))
    random = [ablation.effects(grouped(draw)) for draw in draws]
    joint = [
        {
            "set": "candidates",
            "n_neurons": len(candidates),
            **compare(mine, random, settings),
            **base,
        }
    ]
    add_verdicts(rows + joint, settings.top1_margin)
    return rows, joint


def reference_matches(
    candidates: pd.DataFrame, table: pd.DataFrame, reference: pd.DataFrame
) -> pd.DataFrame:
    """Each reference neuron: is it a candidate, its internal share, and its norm rank in its
    layer."""
    rows = []
    chosen = set(zip(candidates["layer"], candidates["neuron"]))
    for layer, neuron in zip(reference["layer"], reference["neuron"]):
        part = table[table["layer"] == layer]
        hit = part[part["neuron"] == neuron]
        if hit.empty:
            raise LensspaceError(f"reference neuron {layer}.{neuron} does not exist in this model")
        norm_rank = int((part["norm"] > float(hit["norm"].iloc[0])).sum()) + 1
        rows.append(
            {
                "layer": int(layer),
                "neuron": int(neuron),
                "is_candidate": (layer, neuron) in chosen,
                "norm": float(hit["norm"].iloc[0]),
                "norm_rank_in_layer": norm_rank,
                "internal_fraction": float(hit["internal_fraction"].iloc[0]),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "layer",
            "neuron",
            "is_candidate",
            "norm",
            "norm_rank_in_layer",
            "internal_fraction",
        ],
    )


def run_neurons(
    adapter: Adapter,
    lens: TunedLens,
    cache: ActivationCache,
    basis: torch.Tensor,
    tokens: dict[str, torch.Tensor],
    settings: NeuronSettings,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """neurons.tsv (every neuron, with its activation statistics), candidates.tsv, joint.tsv."""
    table = neuron_geometry(adapter, lens, basis, settings.k, settings.null_k)
    device = adapter.embed.weight.device
    means, _ = activation_stats(adapter, tokens["train"][: settings.mean_sequences].to(device))
    eval_ids = tokens["eval"][: settings.eval_sequences].to(device)
    _, rms = activation_stats(adapter, eval_ids)
    table["mean_activation"] = torch.cat(means).numpy()
    table["rms_activation"] = torch.cat(rms).numpy()
    table["k"] = settings.k
    table["in_candidate_layers"] = table["layer"].isin(settings.candidate_layers)
    candidates = pick_candidates(table, settings)
    table["is_candidate"] = table.index.isin(candidates.index)
    print(
        f"{len(candidates)} candidates among "
        f"{int(table['layer'].isin(settings.candidate_layers).sum())} "
        f"neurons of layers {list(settings.candidate_layers)}",
        flush=True,
    )
    ablation = NeuronAblation(BlockRunner(adapter), cache, means, len(eval_ids))
    rows, joint = causal_test(ablation, table, candidates, settings)
    geometry = candidates.drop(columns=["in_candidate_layers"]).reset_index(drop=True)
    merged = geometry.merge(pd.DataFrame(rows), on=["layer", "neuron"]) if rows else geometry
    return table, merged, pd.DataFrame(joint)
