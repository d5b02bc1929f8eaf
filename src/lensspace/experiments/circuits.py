"""Circuit ends: do induction heads write into the output subspace more than other heads?

Per attention head: an induction score (attention from each token of a repeated random
sequence's second copy to the token after its first occurrence) and the fraction of the
head's write into the residual stream (``o_h @ W_O[h]``, on real text) that lies in the
output / internal subspace of the layer it writes to (the lens-space subspace pulled back
through that layer's translator; the raw unembedding basis after the last block). The same
fractions for each block's MLP write. A permutation test within depth bins answers the
question with a statistic and a p-value.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from tuned_lens.nn import TunedLens

from lensspace.adapter import Adapter
from lensspace.experiments.h1 import PULLED_BACK
from lensspace.subspaces import Basis, pullback, select


@dataclass(frozen=True)
class CircuitSettings:
    """Induction probe size, subspace size, and the test's threshold, bins and permutations."""

    k: int
    induction_sequences: int = 8
    induction_half_len: int = 48
    induction_threshold: float = 0.3
    depth_bins: int = 3
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
    half = torch.randint(0, vocab_size, (settings.induction_sequences, settings.induction_half_len),
                         generator=gen)
    ids = torch.cat([half, half], dim=1).to(adapter.embed.weight.device)
    with eager_attention(adapter):
        out = adapter.model(ids, output_attentions=True, use_cache=False)
    return torch.stack([induction_pattern_score(a.float().cpu(), settings.induction_half_len)
                        for a in out.attentions])


@torch.no_grad()
def writes(adapter: Adapter, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: head writes [batch, T, n_heads, d] and the MLP write [batch, T, d]."""
    head_in: dict[int, torch.Tensor] = {}
    mlp_out: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(adapter.n_layers):
        handles.append(adapter.attention_out(layer).register_forward_pre_hook(
            lambda _m, args, layer=layer: head_in.__setitem__(layer, args[0])))
        handles.append(adapter.mlp(layer).register_forward_hook(
            lambda _m, _args, out, layer=layer: mlp_out.__setitem__(layer, out)))
    try:
        adapter.model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    heads = []
    for layer in range(adapter.n_layers):
        w = adapter.head_out_weights(layer)  # [H, dh, d]
        o = head_in[layer].reshape(*head_in[layer].shape[:2], adapter.n_heads, -1)
        heads.append(torch.einsum("bthe,hed->bthd", o, w))
    return heads, [mlp_out[i] for i in range(adapter.n_layers)]


def written_subspaces(adapter: Adapter, lens: TunedLens, bases: dict[str, Basis],
                      k: int) -> list[dict[str, torch.Tensor]]:
    """For block ``i``: output/internal bases of the residual it writes to (layer ``i + 1``)."""
    spaces = []
    for layer in range(adapter.n_layers):
        target = layer + 1
        space = {}
        for subspace in ("output", "internal"):
            lens_q = select(bases[PULLED_BACK].vectors, subspace, k)
            if target < adapter.n_layers:
                space[subspace] = pullback(lens.layer_translators[target].weight.detach(), lens_q)
            else:  # the final residual goes straight to the unembedding
                space[subspace] = lens_q
        spaces.append(space)
    return spaces


@torch.no_grad()
def head_and_mlp_fractions(adapter: Adapter, lens: TunedLens, bases: dict[str, Basis],
                           ids: torch.Tensor, k: int, chunk: int = 4):
    """Output/internal fractions [L, H] of head writes and [L] of MLP writes on real text."""
    spaces = written_subspaces(adapter, lens, bases, k)
    acc = {name: torch.zeros(adapter.n_layers, adapter.n_heads, dtype=torch.float64)
           for name in ("head_out", "head_int", "head_all")}
    acc.update({name: torch.zeros(adapter.n_layers, dtype=torch.float64)
                for name in ("mlp_out", "mlp_int", "mlp_all")})
    for start in range(0, len(ids), chunk):
        heads, mlps = writes(adapter, ids[start: start + chunk].long())
        for layer, (hw, mw) in enumerate(zip(heads, mlps)):
            hw = hw[:, 1:].permute(2, 0, 1, 3).reshape(adapter.n_heads, -1, adapter.d_model).double()
            mw = mw[:, 1:].reshape(-1, adapter.d_model).double()
            q_out, q_int = spaces[layer]["output"].double(), spaces[layer]["internal"].double()
            acc["head_out"][layer] += (hw @ q_out).pow(2).sum((1, 2))
            acc["head_int"][layer] += (hw @ q_int).pow(2).sum((1, 2))
            acc["head_all"][layer] += hw.pow(2).sum((1, 2))
            acc["mlp_out"][layer] += (mw @ q_out).pow(2).sum()
            acc["mlp_int"][layer] += (mw @ q_int).pow(2).sum()
            acc["mlp_all"][layer] += mw.pow(2).sum()
    heads = (acc["head_out"] / acc["head_all"], acc["head_int"] / acc["head_all"])
    mlps = (acc["mlp_out"] / acc["mlp_all"], acc["mlp_int"] / acc["mlp_all"])
    return heads, mlps


def depth_bins(n_layers: int, n_bins: int) -> torch.Tensor:
    """Bin index [n_layers] splitting the layers into ``n_bins`` contiguous, near-equal ranges."""
    return torch.div(torch.arange(n_layers) * n_bins, n_layers, rounding_mode="floor")


def permutation_test(values: torch.Tensor, is_induction: torch.Tensor, bins: torch.Tensor,
                     n_permutations: int, seed: int) -> dict:
    """Do flagged heads have larger ``values`` than unflagged heads of the same depth bin?

    Statistic: mean over flagged heads of (value - mean value of unflagged heads in its bin),
    over bins holding both kinds. Null: flags permuted within bins. One-sided p-value.
    """
    values, flags, bins = values.flatten().double(), is_induction.flatten(), bins.flatten()
    usable = torch.zeros_like(flags)
    for b in bins.unique():
        members = bins == b
        if flags[members].any() and (~flags[members]).any():
            usable |= members
    n_flagged = int((flags & usable).sum())
    if n_flagged == 0:
        return {"statistic": float("nan"), "p_value": float("nan"), "n_induction": int(flags.sum()),
                "n_compared": 0, "n_permutations": 0}

    def statistic(f: torch.Tensor) -> float:
        total = 0.0
        for b in bins[usable].unique():
            members = usable & (bins == b)
            others = values[members & ~f].mean()
            total += float((values[members & f] - others).sum())
        return total / n_flagged

    observed = statistic(flags)
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(n_permutations):
        permuted = flags.clone()
        for b in bins[usable].unique():
            idx = torch.nonzero(usable & (bins == b)).flatten()
            permuted[idx] = flags[idx][torch.randperm(len(idx), generator=gen)]
        hits += statistic(permuted) >= observed
    return {"statistic": observed, "p_value": (1 + hits) / (1 + n_permutations),
            "n_induction": int(flags.sum()), "n_compared": n_flagged, "n_permutations": n_permutations}
