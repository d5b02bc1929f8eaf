"""Circuit ends down to single MLP neurons, and the entropy neurons of the last block.

Geometry, every neuron of every block: neuron ``j`` of block ``l`` writes ``a_j * w_j`` into
residual ``l + 1`` (``w_j`` a row of :meth:`~lensspace.adapter.Adapter.neuron_out_weights`); in
lens space that write is ``M w_j``, ``M`` the translator map of
:func:`~lensspace.experiments.circuits.write_maps` (``I + A_{l+1}``; ``I`` after the last block).
Per neuron: ``||w||``, the output (top-k) and internal (bottom-k) shares ``||Q^T M w||^2 /
||M w||^2``, the spread of its direct logit effect, and its share in the effective null space of
the unembedding (:func:`null_space`).

Entropy neurons (Stolfo et al. 2024) are last-block neurons of large norm that write into that
null space: the logits barely read the write, but it changes the final norm's scale, and so the
output's entropy. Here they are found and tested in three steps.

* Which neurons: the ``n_candidates`` largest-norm neurons of the last block whose null-space
  share is at least ``null_ratio`` times a random direction's expected share, and always the
  block's ``n_largest`` largest-norm neurons and any published ones.
* What is measured: each neuron mean-ablated alone (its activation replaced by its training mean
  at positions 1..), which adds ``(mean - a) w`` to the final residual. The total effect runs that
  residual through the final norm; the direct effect freezes the norm's scale at its clean value;
  their difference is the effect the scale mediates. Per neuron: the mean absolute entropy change
  total, direct and mediated, the mediated share ``|dH_med| / (|dH_med| + |dH_dir|)``, KL and top-1
  changes total and direct, and the change of the log of the norm's scale.
* Against what: the neuron is the unit. Each measured neuron is ranked on its mediated share among
  the ``n_matched`` other last-block neurons nearest in log norm to the measured ones (one shared
  pool), ``p = (1 + #{matched >= it}) / (n_matched + 1)`` (exact when the neuron is just another
  matched neuron), Holm-adjusted over the measured neurons. An entropy neuron has mediated share
  at least ``min_mediated_share`` and an adjusted p below 0.05.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm import tqdm
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.divergences import KLReference
from lensspace.errors import LensspaceError
from lensspace.experiments.circuits import write_maps
from lensspace.robustness import ALPHA, CORRECTION
from lensspace.runner import BlockRunner
from lensspace.stats import adjust, bootstrap_mean, resample_counts
from lensspace.subspaces import select

# Per-token effects of one neuron's ablation, averaged per sequence.
METRICS = (
    "abs_dh_total",
    "abs_dh_direct",
    "abs_dh_mediated",
    "kl_total",
    "kl_direct",
    "top1_total",
    "top1_direct",
    "d_log_scale",
)
# Per-sequence shares of flipped tokens are discrete and often tied: their intervals are BCa.
DISCRETE = {"top1_total", "top1_direct"}
ROLES = ("candidate", "largest", "published")


@dataclass(frozen=True)
class NeuronSettings:
    """Which last-block neurons are measured, against how many matched ones, and the criterion.

    ``null_k``: size of the effective null space; ``null_ratio``: a candidate's null-space share is
    at least this many times a random direction's; ``n_matched``: the control neurons, the block's
    others nearest in log norm to the measured ones; ``min_mediated_share``: the share of the
    entropy effect an entropy neuron passes through the norm's scale.
    """

    k: int
    null_k: int
    null_ratio: float = 10.0
    n_candidates: int = 8
    n_largest: int = 4  # at least 1: the block's largest neurons are always reported
    n_matched: int = 300
    min_mediated_share: float = 0.5
    eval_sequences: int = 16
    mean_sequences: int = 32
    n_boot: int = 1000
    seed: int = 0

    @classmethod
    def from_config(cls, config: dict, d_model: int) -> NeuronSettings:
        """From the config's ``neurons`` block (``null_share`` of d_model, at least 1)."""
        section = config["neurons"]
        return cls(
            k=d_model // 2,
            null_k=max(1, round(section["null_share"] * d_model)),
            null_ratio=section["null_ratio"],
            n_candidates=section["n_candidates"],
            n_largest=section["n_largest"],
            n_matched=section["n_matched"],
            min_mediated_share=section["min_mediated_share"],
            eval_sequences=section["eval_sequences"],
            mean_sequences=section["mean_sequences"],
            n_boot=config["bootstrap"]["n_resamples"],
            seed=config["seed"],
        )


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


def random_null_share(adapter: Adapter, null_k: int) -> float:
    """The expected share of a random direction in a ``null_k``-dimensional subspace of what the
    final norm outputs (LayerNorm's output is centred: one dimension fewer)."""
    return null_k / (adapter.d_model - (adapter.norm_kind == "layernorm"))


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
        w = adapter.neuron_write_directions(layer).detach().double().cpu()  # [n, d]
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
            frame["null_random"] = random_null_share(adapter, q_null.shape[1])
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


def measured_neurons(
    table: pd.DataFrame, settings: NeuronSettings, published: Iterable[int] = ()
) -> pd.DataFrame:
    """The last block's neurons to measure, largest norm first, each with its ``role``s
    (``candidate``, ``largest``, ``published``, joined by ``+``)."""
    last = table[table["layer"] == table["layer"].max()]
    by_norm = last.sort_values(["norm", "neuron"], ascending=[False, True])
    threshold = settings.null_ratio * float(last["null_random"].iloc[0])
    roles: dict[int, list[str]] = {}
    chosen = (
        by_norm[by_norm["null_fraction"] >= threshold].head(settings.n_candidates),
        by_norm.head(settings.n_largest),
        last[last["neuron"].isin(list(published))],
    )
    for role, rows in zip(ROLES, chosen):
        for neuron in rows["neuron"]:
            roles.setdefault(int(neuron), []).append(role)
    out = by_norm[by_norm["neuron"].isin(list(roles))].copy()
    out["role"] = [("+".join(roles[int(n)])) for n in out["neuron"]]
    return out.reset_index(drop=True)


def matched_pool(table: pd.DataFrame, measured: pd.DataFrame, n_matched: int) -> list[int]:
    """The ``n_matched`` other last-block neurons nearest in log norm to any measured neuron: one
    pool of neurons like them that every measured neuron is ranked in (the ablations are shared)."""
    last = table[table["layer"] == table["layer"].max()]
    others = last[~last["neuron"].isin(measured["neuron"])]
    if len(others) < n_matched:
        raise LensspaceError(
            f"neurons.n_matched ({n_matched}) is more than the {len(others)} last-block neurons "
            "left beside the measured ones: lower it"
        )
    logs = torch.tensor(others["norm"].to_numpy(), dtype=torch.float64).log()
    targets = torch.tensor(measured["norm"].to_numpy(), dtype=torch.float64).log()
    distance = (logs.unsqueeze(1) - targets.unsqueeze(0)).abs().min(1).values
    order = torch.argsort(distance, stable=True)[:n_matched]
    return sorted(int(j) for j in others["neuron"].iloc[order.numpy()])


def rank_p_value(value: float, matched: torch.Tensor) -> float:
    """``(1 + #{matched >= value}) / (len(matched) + 1)``: the rank p-value of one neuron among its
    matched ones (ties count against it), at most ``a`` with probability at most ``a`` when the
    neuron is exchangeable with them."""
    return (1 + int((matched >= value).sum())) / (len(matched) + 1)


class FinalResidualAblation:
    """Mean ablation of single last-block neurons, total and with the final norm's scale frozen.

    A last-block neuron's ablation adds ``D_t = d_t w`` to the final residual ``z_t`` (``d_t =
    mean - a_t``); with ``c`` the norm's centring, ``s`` its scale and ``A`` the head's linear map,
    the logits before any soft-cap are ``(A c(z) + A c(D)) / s' + b``, where ``s'`` is the scale of
    ``c(z) + c(D)`` (total) or of ``c(z)`` (direct). So one product ``A c(z)`` serves every
    neuron, and ``A c(D) = d A c(w)`` makes the vocabulary-sized work per neuron elementwise.
    Where the write does not enter the final residual linearly (a norm after the MLP, Gemma 2/3;
    a block that normalises its output, OPT-350m), ``D`` comes from running the last block again
    with the neuron ablated (``rerun``), and ``A c(D)`` is a product per neuron.
    """

    def __init__(
        self,
        adapter: Adapter,
        z: torch.Tensor,
        activations: torch.Tensor,
        means: torch.Tensor,
        rerun: Callable[[int, float], torch.Tensor] | None = None,
        chunk: int = 64,
    ):
        """``z`` [n_seq, n_pos, d]: final residuals before the norm; ``activations`` [n_seq, n_pos,
        n_neurons]: the last MLP's; ``means``: the training means that replace them; ``rerun(j,
        value)``: the final residual with neuron ``j`` held at ``value``, where the write is not
        linear (:func:`linear_write`)."""
        self.adapter, self.chunk, self.rerun, self.means = adapter, chunk, rerun, means
        self.z = z.reshape(-1, z.shape[-1]).float()
        self.n_seq, self.n_pos = z.shape[:2]
        with torch.no_grad():
            zc = adapter.centre(z.reshape(-1, z.shape[-1]).float())
            self.zc = zc
            self.square = zc.square().sum(-1)
            self.scale = adapter.norm_scale(zc).squeeze(-1)
            self.bias = adapter.logits_before_cap(torch.zeros_like(zc[:1]))[0]
            self.linear = adapter.logits_before_cap(zc) - self.bias
        self.delta = means.float() - activations.reshape(-1, activations.shape[-1]).float()

    def _logits(
        self,
        rows: slice,
        inv_scale: torch.Tensor,
        change: torch.Tensor | None = None,
        along: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Capped logits of the tokens ``rows``: ``(A c(z) + change) * inv_scale + b``, the change
        given as [rows, V], or as ``change`` [rows] times one vocabulary vector ``along``."""
        linear = self.linear[rows]
        if change is not None and along is None:
            out = torch.add(linear, change).mul_(inv_scale.unsqueeze(-1))
        else:
            out = torch.mul(linear, inv_scale.unsqueeze(-1))
            if change is not None:
                out.addr_(change * inv_scale, along)
        out += self.bias
        return self.adapter.cap_logits(out)

    @torch.no_grad()
    def effects(self, neurons: list[int], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per metric, [len(neurons), n_seq]: each neuron's effects, mean over positions per
        sequence (``weights``: the last block's output weights [n_neurons, d])."""
        adapter, d = self.adapter, self.zc.shape[-1]
        w = adapter.centre(weights[neurons].float())
        moved = {
            j: adapter.centre(self.rerun(j, float(self.means[j])).reshape(self.z.shape) - self.z)
            for j in (neurons if self.rerun is not None else ())
        }
        u = adapter.logits_before_cap(w) - self.bias  # A c(w) per neuron
        cross = self.zc @ w.T  # [T, n]
        w_square = w.square().sum(-1)
        sums = {
            name: torch.zeros(
                len(neurons), self.n_seq * self.n_pos, dtype=torch.float64, device=w.device
            )
            for name in METRICS
        }
        no_norm = adapter.norm_kind == "none"
        for start in tqdm(
            range(0, len(self.zc), self.chunk),
            desc=f"{len(neurons)} neurons",
            unit="chunk",
            file=sys.stderr,
            mininterval=10,
        ):
            rows = slice(start, start + self.chunk)
            inv = 1 / self.scale[rows]
            clean_logits = self._logits(rows, inv)
            reference = KLReference.from_logits(clean_logits)
            clean = reference.compare(clean_logits.clone())
            for i, j in enumerate(neurons):
                step = self.delta[rows, j]
                if self.rerun is None:
                    change, along = step, u[i]
                    mean_square = (
                        self.square[rows] + 2 * step * cross[rows, i] + step.square() * w_square[i]
                    ) / d
                else:
                    change, along = adapter.logits_before_cap(moved[j][rows]) - self.bias, None
                    mean_square = (self.zc[rows] + moved[j][rows]).square().mean(-1)
                scale = self.scale[rows] if no_norm else (mean_square + adapter.norm_eps).sqrt()
                total = reference.compare(self._logits(rows, 1 / scale, change, along))
                direct = reference.compare(self._logits(rows, inv, change, along))
                dh_total = total.entropy.double() - clean.entropy.double()
                dh_direct = direct.entropy.double() - clean.entropy.double()
                per_token = {
                    "abs_dh_total": dh_total.abs(),
                    "abs_dh_direct": dh_direct.abs(),
                    "abs_dh_mediated": (dh_total - dh_direct).abs(),
                    "kl_total": total.kl.double(),
                    "kl_direct": direct.kl.double(),
                    "top1_total": (total.top1 != clean.top1).double(),
                    "top1_direct": (direct.top1 != clean.top1).double(),
                    "d_log_scale": (scale.log() - self.scale[rows].log()).abs().double(),
                }
                for name, values in per_token.items():
                    sums[name][i, rows] = values
        return {
            name: values.view(len(neurons), self.n_seq, self.n_pos).mean(-1).cpu()
            for name, values in sums.items()
        }


def mediated_share(mediated: torch.Tensor, direct: torch.Tensor) -> torch.Tensor:
    """``mediated / (mediated + direct)`` of mean absolute entropy changes; 0 where both are 0."""
    total = mediated + direct
    return torch.where(total > 0, mediated / total.clamp_min(1e-300), torch.zeros_like(total))


def linear_write(adapter: Adapter) -> bool:
    """Whether a last-block neuron's ablation adds ``d w`` to the final residual: no norm after
    the MLP, and a final norm after the blocks (OPT-350m's blocks normalise their own output)."""
    return adapter.final_norm is not None and adapter.mlp_write_norm(adapter.n_layers - 1) is None


class LastBlock:
    """The last block on the held-out sequences, from its cached input: the final residual and the
    MLP's activations at positions 1.., and the final residual again with one neuron held fixed."""

    def __init__(self, adapter: Adapter, cache: ActivationCache, n_sequences: int, chunk: int = 4):
        self.adapter, self.chunk = adapter, chunk
        self.layer = adapter.n_layers - 1
        self.h = cache.load(self.layer, "eval")[:n_sequences]
        self.runner = BlockRunner(adapter)

    @torch.no_grad()
    def _run(self, hook) -> torch.Tensor:
        finals = []
        with ExitStack() as stack:
            handle = self.adapter.mlp_out(self.layer).register_forward_pre_hook(hook)
            stack.callback(handle.remove)
            for i in range(0, len(self.h), self.chunk):
                finals.append(self.runner.run(self.h[i : i + self.chunk], start=self.layer))
        return torch.cat(finals)[:, 1:].float()

    def clean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The final residual [n_seq, n_pos - 1, d] and the activations [..., n_neurons]."""
        captured: list[torch.Tensor] = []

        def hook(_module, args):
            captured.append(by_position(args[0], self.h.shape[1])[:, 1:].float())

        return self._run(hook), torch.cat(captured)

    def ablated(self, neuron: int, value: float) -> torch.Tensor:
        """The final residual with ``neuron``'s activation set to ``value`` at positions 1.."""

        def hook(_module, args):
            a = args[0].clone()
            by_position(a, self.h.shape[1])[:, 1:, neuron] = value
            return (a, *args[1:])

        return self._run(hook)


def _interval(name: str, values: torch.Tensor, settings: NeuronSettings) -> dict:
    method = "bca" if name in DISCRETE else "studentized"
    est = bootstrap_mean(values, settings.n_boot, settings.seed, method=method)
    return {name: est.mean, f"{name}_lo": est.lo, f"{name}_hi": est.hi}


def _share_interval(
    mediated: torch.Tensor, direct: torch.Tensor, settings: NeuronSettings
) -> tuple[float, float]:
    """95% percentile bootstrap interval over sequences of the mediated share (a ratio of
    means)."""
    counts = resample_counts(len(mediated), settings.n_boot, settings.seed)
    share = mediated_share(counts @ mediated, counts @ direct)
    lo, hi = torch.quantile(share, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def entropy_test(
    ablation: FinalResidualAblation,
    weights: torch.Tensor,
    table: pd.DataFrame,
    measured: pd.DataFrame,
    settings: NeuronSettings,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of measured.tsv (each measured neuron: effects with intervals, its matched neurons'
    medians, rank p-values, the verdict) and the per-neuron means of every neuron ablated."""
    matched = matched_pool(table, measured, settings.n_matched)
    evaluated = sorted(set(measured["neuron"]) | set(matched))
    print(
        f"ablating {len(evaluated)} last-block neurons: {len(measured)} measured and "
        f"{settings.n_matched} matched",
        flush=True,
    )
    effects = ablation.effects(evaluated, weights)
    index = {j: i for i, j in enumerate(evaluated)}
    means = {name: values.mean(1) for name, values in effects.items()}
    share = mediated_share(means["abs_dh_mediated"], means["abs_dh_direct"])
    per_neuron = pd.DataFrame(
        {"neuron": evaluated, **{n: v.numpy() for n, v in means.items()}, "mediated_share": share}
    )
    norms = table[table["layer"] == table["layer"].max()].set_index("neuron")["norm"]
    rows = []
    for neuron in measured["neuron"]:
        i = index[int(neuron)]
        pool = torch.tensor([index[j] for j in matched])
        row: dict = {"neuron": int(neuron)}
        for name in METRICS:
            row.update(_interval(name, effects[name][i], settings))
        row["mediated_share"] = float(share[i])
        row["mediated_share_lo"], row["mediated_share_hi"] = _share_interval(
            effects["abs_dh_mediated"][i], effects["abs_dh_direct"][i], settings
        )
        for name in ("mediated_share", "abs_dh_mediated", "kl_total", "top1_total"):
            values = share[pool] if name == "mediated_share" else means[name][pool]
            row[f"matched_{name}_median"] = float(values.median())
        matched_norms = norms.loc[matched]
        row["matched_norm_min"], row["matched_norm_max"] = (
            float(matched_norms.min()),
            float(matched_norms.max()),
        )
        row["p_mediated_share"] = rank_p_value(float(share[i]), share[pool])
        row["n_matched"] = len(pool)
        rows.append(row)
    frame = pd.DataFrame(rows)
    smallest = len(frame) / (settings.n_matched + 1)  # Holm's smallest adjusted rank p-value
    if smallest >= ALPHA:
        print(
            f"warning: {len(frame)} measured neurons against {settings.n_matched} matched each: "
            f"the smallest adjusted p-value is {smallest:.3g}, not below {ALPHA}, so no neuron "
            f"can be an entropy neuron; raise neurons.n_matched above "
            f"{math.ceil(len(frame) / ALPHA) - 1}",
            flush=True,
        )
    frame["p_mediated_share_adjusted"] = adjust(list(frame["p_mediated_share"]), CORRECTION)
    frame["verdict_possible"] = smallest < ALPHA
    frame["final_norm"] = ablation.adapter.norm_kind != "none"
    # without a final norm (OPT-350m) there is no scale to freeze: the test does not apply
    frame["entropy_neuron"] = (
        (frame["mediated_share"] >= settings.min_mediated_share)
        & (frame["p_mediated_share_adjusted"] < ALPHA)
        & frame["final_norm"]
    )
    frame["n_sequences"] = ablation.n_seq
    frame["n_tokens"] = ablation.n_seq * ablation.n_pos
    return measured.merge(frame, on="neuron"), per_neuron


def run_neurons(
    adapter: Adapter,
    lens: TunedLens,
    cache: ActivationCache,
    basis: torch.Tensor,
    tokens: dict[str, torch.Tensor],
    settings: NeuronSettings,
    published: Iterable[int] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """neurons.tsv (every neuron: geometry, activation statistics, and the effects of those of the
    last block that were ablated) and measured.tsv (``published``: last-block neurons to measure
    whatever their geometry)."""
    table = neuron_geometry(adapter, lens, basis, settings.k, settings.null_k)
    device = adapter.embed.weight.device
    means, _ = activation_stats(adapter, tokens["train"][: settings.mean_sequences].to(device))
    eval_ids = tokens["eval"][: settings.eval_sequences].to(device)
    _, rms = activation_stats(adapter, eval_ids)
    table["mean_activation"] = torch.cat(means).numpy()
    table["rms_activation"] = torch.cat(rms).numpy()
    table["k"] = settings.k
    measured = measured_neurons(table, settings, published)
    last = adapter.n_layers - 1
    block = LastBlock(adapter, cache, len(eval_ids))
    z, activations = block.clean()
    ablation = FinalResidualAblation(
        adapter,
        z,
        activations,
        means[last].to(z.device),
        rerun=None if linear_write(adapter) else block.ablated,
    )
    weights = adapter.neuron_out_weights(last).detach()
    rows, per_neuron = entropy_test(ablation, weights, table, measured, settings)
    table = table.merge(per_neuron.assign(layer=last), on=["layer", "neuron"], how="left")
    roles = dict(zip(measured["neuron"], measured["role"]))
    table["role"] = [
        roles.get(n, "") if layer == last else ""
        for layer, n in zip(table["layer"], table["neuron"])
    ]
    return table, rows


def reference_matches(
    table: pd.DataFrame, measured: pd.DataFrame, reference: pd.DataFrame
) -> pd.DataFrame:
    """Each published neuron: its norm rank and null-space share in its layer, and, for those of the
    last block (all measured), its mediated share and verdict."""
    columns = [
        "layer",
        "neuron",
        "norm",
        "norm_rank_in_layer",
        "null_fraction",
        "role",
        "mediated_share",
        "p_mediated_share_adjusted",
        "entropy_neuron",
    ]
    rows = []
    verdicts = measured.set_index("neuron")
    last = int(table["layer"].max())
    for layer, neuron in zip(reference["layer"], reference["neuron"]):
        part = table[table["layer"] == layer]
        hit = part[part["neuron"] == neuron]
        if hit.empty:
            raise LensspaceError(f"reference neuron {layer}.{neuron} does not exist in this model")
        row = {
            "layer": int(layer),
            "neuron": int(neuron),
            "norm": float(hit["norm"].iloc[0]),
            "norm_rank_in_layer": int((part["norm"] > float(hit["norm"].iloc[0])).sum()) + 1,
            "null_fraction": float(hit["null_fraction"].iloc[0]),
        }
        if layer == last and neuron in verdicts.index:
            mine = verdicts.loc[neuron]
            row.update({name: mine[name] for name in columns[5:]})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
