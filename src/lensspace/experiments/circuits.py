"""Circuit ends: do induction heads write into the output subspace more than other heads?

Per attention head: an induction score (attention from each token of a repeated random
sequence's second copy to the token after its first occurrence) and the share of the head's
write into the residual stream (``o_h @ W_O[h]``, on real text) that lies in the output /
internal subspace in lens space: block ``i`` writes into residual ``i + 1``, whose translator
maps a write ``w`` to ``M w`` with ``M = I + A_{i+1}`` (``M = I`` after the last block, whose
residual goes straight to the final norm and unembedding). The same shares for each block's
MLP write. A permutation test within layers (heads of one layer share one ``M``) answers the
question with an effect size, its bootstrap interval and a p-value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tuned_lens.nn import TunedLens

from lensspace.adapter import Adapter
from lensspace.experiments.h1 import PULLED_BACK
from lensspace.subspaces import Basis, select


@dataclass(frozen=True)
class CircuitSettings:
    """Induction probe size, subspace size, and the test's threshold and permutations."""

    k: int
    induction_sequences: int = 8
    induction_half_len: int = 48
    induction_threshold: float = 0.3
    n_permutations: int = 10000
    seed: int = 0


def induction_pattern_score(attention: torch.Tensor, half_len: int) -> torch.Tensor:
    """Mean attention [n_heads] from token ``t`` of the second copy to ``t - half_len + 1``.

    ``attention`` is [batch, heads, 2 * half_len, 2 * half_len] over sequences made of one
    random half repeated twice.
    """
    t = torch.arange(half_len, 2 * half_len)
    return attention[:, :, t, t - half_len + 1].mean(dim=(0, 2))


@contextmanager
def eager_attention(adapter: Adapter) -> Iterator[None]:
    """Attention probabilities are only returned by the eager implementation."""
    previous = adapter.model.config._attn_implementation
    adapter.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        adapter.model.set_attn_implementation(previous)


@torch.no_grad()
def induction_scores(adapter: Adapter, settings: CircuitSettings, vocab_size: int) -> torch.Tensor:
    """[n_layers, n_heads] induction scores on seeded random repeated sequences."""
    gen = torch.Generator().manual_seed(settings.seed)
    half = torch.randint(
        0, vocab_size, (settings.induction_sequences, settings.induction_half_len), generator=gen
    )
    ids = adapter.to_device(torch.cat([half, half], dim=1))
    with eager_attention(adapter):
        out = adapter.model(ids, output_attentions=True, use_cache=False)
    return torch.stack(
        [
            induction_pattern_score(a.float().cpu(), settings.induction_half_len)
            for a in out.attentions
        ]
    )


@torch.no_grad()
def block_outputs(
    adapter: Adapter, ids: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: each head's input to ``W_O`` [batch, T, H, head_dim] and the MLP write [batch, T,
    d].

    Where a norm follows the attention (Gemma 2/3), the head inputs are divided by its per-token
    scale, so that with :meth:`~lensspace.adapter.Adapter.head_out_weights` they give the residual
    write.
    """
    head_in: dict[int, torch.Tensor] = {}
    mlp_out: dict[int, torch.Tensor] = {}

    def record_heads(layer: int):
        def hook(_module, args, out):
            head_in[layer] = args[0] / adapter.attention_write_scale(layer, out)

        return hook

    handles = []
    for layer in range(adapter.n_layers):
        handles.append(adapter.attention_out(layer).register_forward_hook(record_heads(layer)))
        handles.append(
            adapter.mlp(layer).register_forward_hook(
                lambda _m, _args, out, layer=layer: mlp_out.__setitem__(layer, out)
            )
        )
    try:
        adapter.model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # OPT's MLP runs on [batch * T, d]: every write is reshaped to [batch, T, d]
    return (
        [head_in[i].reshape(*ids.shape, adapter.n_heads, -1) for i in range(adapter.n_layers)],
        [mlp_out[i].reshape(*ids.shape, -1) for i in range(adapter.n_layers)],
    )


@torch.no_grad()
def writes(adapter: Adapter, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: head writes [batch, T, n_heads, d] (``o_h @ W_O[h]``) and the MLP write [batch, T,
    d]."""
    head_in, mlps = block_outputs(adapter, ids)
    heads = [
        torch.einsum("bthe,hed->bthd", o, adapter.head_out_weights(layer))
        for layer, o in enumerate(head_in)
    ]
    return heads, mlps


def write_maps(adapter: Adapter, lens: TunedLens) -> list[torch.Tensor]:
    """For block ``i``: ``M`` [d, d] (float64) taking its write into lens space.

    The write lands in residual ``i + 1``, so ``M = I + A_{i+1}``; after the last block the
    residual goes straight to the final norm, so ``M = I``. A write is a difference of
    residuals, so the translator's bias cancels.
    """
    eye = torch.eye(adapter.d_model, dtype=torch.float64)
    return [
        eye + lens.layer_translators[block + 1].weight.detach().double().cpu()
        if block + 1 < adapter.n_layers
        else eye
        for block in range(adapter.n_layers)
    ]


@dataclass(frozen=True)
class WriteShares:
    """Lens-space shares of writes ([L, H] for heads, [L] for MLPs) and their sizes.

    ``output`` / ``internal``: sum over tokens of ``||Q^T M w||^2`` over the sum of
    ``||M w||^2`` (a ratio of summed squared norms, so tokens with larger writes weigh more).
    ``write_norm`` / ``lens_write_norm``: root mean square over tokens of ``||w||`` / ``||M w||``.
    """

    output: torch.Tensor
    internal: torch.Tensor
    write_norm: torch.Tensor
    lens_write_norm: torch.Tensor


def write_shares(
    moment: torch.Tensor,
    out_weight: torch.Tensor,
    m: torch.Tensor,
    q_out: torch.Tensor,
    q_int: torch.Tensor,
    n_tokens: int,
) -> WriteShares:
    """Shares of writes ``w = x @ out_weight`` from the inputs' second moment ``sum_t x_t^T x_t``.

    ``moment`` [..., e, e], ``out_weight`` [..., e, d]: summed over tokens, ``||x A||^2`` is
    ``tr(A^T moment A)``, so no per-token write in lens space is ever formed.
    """
    lens_weight = out_weight @ m.T  # rows: M applied to each row of out_weight

    def energy(a: torch.Tensor) -> torch.Tensor:
        return ((moment @ a) * a).sum((-2, -1))

    total = energy(lens_weight)
    return WriteShares(
        output=energy(lens_weight @ q_out) / total,
        internal=energy(lens_weight @ q_int) / total,
        write_norm=(energy(out_weight) / n_tokens).sqrt(),
        lens_write_norm=(total / n_tokens).sqrt(),
    )


@torch.no_grad()
def head_and_mlp_fractions(
    adapter: Adapter,
    lens: TunedLens,
    bases: dict[str, Basis],
    ids: torch.Tensor,
    k: int,
    chunk: int = 4,
) -> tuple[WriteShares, WriteShares]:
    """Lens-space output/internal shares of every head's and every MLP's write on real text.

    Position 0 (the attention sink) is excluded, as everywhere else. A head's write is
    ``o_h @ W_O[h]`` and an MLP's is its output (``out_weight = I``).
    """
    n_layers, n_heads, d = adapter.n_layers, adapter.n_heads, adapter.d_model
    head_dim = adapter.head_out_weights(0).shape[1]
    head_moment = torch.zeros(n_layers, n_heads, head_dim, head_dim, dtype=torch.float64)
    mlp_moment = torch.zeros(n_layers, d, d, dtype=torch.float64)
    n_tokens = 0
    for start in range(0, len(ids), chunk):
        batch = ids[start : start + chunk].long()
        head_in, mlps = block_outputs(adapter, batch)
        n_tokens += batch[:, 1:].numel()
        for layer in range(n_layers):
            o = head_in[layer][:, 1:].reshape(-1, n_heads, head_dim).double().cpu()
            head_moment[layer] += torch.einsum("nhe,nhf->hef", o, o)
            w = mlps[layer][:, 1:].reshape(-1, d).double().cpu()
            mlp_moment[layer] += w.T @ w
    q_out = select(bases[PULLED_BACK].vectors, "output", k).double().cpu()
    q_int = select(bases[PULLED_BACK].vectors, "internal", k).double().cpu()
    eye = torch.eye(d, dtype=torch.float64)
    heads, mlps = [], []
    for layer, m in enumerate(write_maps(adapter, lens)):
        w_o = adapter.head_out_weights(layer).detach().double().cpu()
        heads.append(write_shares(head_moment[layer], w_o, m, q_out, q_int, n_tokens))
        mlps.append(write_shares(mlp_moment[layer], eye, m, q_out, q_int, n_tokens))
    return tuple(
        WriteShares(
            *(
                torch.stack([getattr(s, field) for s in per_layer])
                for field in ("output", "internal", "write_norm", "lens_write_norm")
            )
        )
        for per_layer in (heads, mlps)
    )


def _within_layer_sum(values: torch.Tensor, chosen: torch.Tensor, n_chosen: int) -> torch.Tensor:
    """Sum over chosen heads of (value - mean of the other heads of the layer), per draw.

    ``values`` [H]; ``chosen`` [..., H] boolean masks with ``n_chosen`` heads set.
    """
    total = values.sum()
    chosen_sum = (values * chosen).sum(-1)
    return chosen_sum - n_chosen * (total - chosen_sum) / (len(values) - n_chosen)


def layer_permutation_test(
    values: torch.Tensor, is_induction: torch.Tensor, n_permutations: int, n_boot: int, seed: int
) -> dict:
    """Do flagged heads have larger ``values`` [L, H] than the unflagged heads of their layer?

    Only layers holding both kinds are compared. Statistic (the effect): mean over flagged
    heads of (value - mean value of the unflagged heads of its layer). Null: flags permuted
    among the heads of each layer; one-sided p-value. Interval: 95% percentile bootstrap in
    which each layer's unflagged heads are resampled within that layer and the flagged heads
    among all compared flagged heads (a layer often holds one induction head, which a
    within-layer resample would never vary).
    """
    values, flags = values.double(), is_induction.bool()
    layers = [layer for layer in range(len(values)) if flags[layer].any() and (~flags[layer]).any()]
    n_flagged = int(flags[layers].sum()) if layers else 0
    base = {
        "n_induction": int(flags.sum()),
        "n_compared": n_flagged,
        "n_layers": len(layers),
        "stratified_by": "layer",
    }
    if n_flagged == 0:
        return {
            "statistic": float("nan"),
            "effect_lo": float("nan"),
            "effect_hi": float("nan"),
            "p_value": float("nan"),
            **base,
            "n_permutations": 0,
        }
    gen = torch.Generator().manual_seed(seed)
    observed = (
        sum(
            _within_layer_sum(values[layer], flags[layer], int(flags[layer].sum()))
            for layer in layers
        )
        / n_flagged
    )
    null = torch.zeros(n_permutations, dtype=torch.float64)
    for layer in layers:
        n_heads, m = values.shape[1], int(flags[layer].sum())
        chosen = torch.rand(n_permutations, n_heads, generator=gen).argsort(-1).argsort(-1) < m
        null += _within_layer_sum(values[layer], chosen, m)
    null /= n_flagged
    hits = int((null >= observed - 1e-12 * max(1.0, abs(float(observed)))).sum())
    flagged_value, flagged_layer, baselines = [], [], []
    for slot, layer in enumerate(layers):
        others = values[layer][~flags[layer]]
        pick = torch.randint(0, len(others), (n_boot, len(others)), generator=gen)
        baselines.append(others[pick].mean(-1))
        flagged_value.append(values[layer][flags[layer]])
        flagged_layer += [slot] * int(flags[layer].sum())
    baseline = torch.stack(baselines, dim=1)  # [n_boot, n_layers]
    flagged_value, flagged_layer = torch.cat(flagged_value), torch.tensor(flagged_layer)
    pick = torch.randint(0, n_flagged, (n_boot, n_flagged), generator=gen)
    boot = (flagged_value[pick] - baseline.gather(1, flagged_layer[pick])).mean(-1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "statistic": float(observed),
        "effect_lo": lo,
        "effect_hi": hi,
        "p_value": (1 + hits) / (1 + n_permutations),
        **base,
        "n_permutations": n_permutations,
    }
