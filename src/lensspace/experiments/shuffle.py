"""Layer-shuffle invariance: how much does the model's output depend on the order of blocks?

``native``: run the blocks in a permuted order. ``lens``: wrap every block as a map of lens
space, ``g_i(z) = T_{i+1}(f_i(T_i^{-1}(z)))`` with ``f_i(h) = h + block_i(h)`` and ``T_L`` the
identity, and compose the wrapped blocks in the permuted order (the "modularised layers").
In the native order both give the model's own output exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.errors import LensspaceError
from lensspace.runner import BlockRunner
from lensspace.stats import bootstrap_mean, kl_from_logprobs

# T_i^-1 is applied in float64, where a condition number up to this loses at most ~4 digits.
MAX_CONDITION = 1e12


@dataclass(frozen=True)
class Permutation:
    """A block order for layers ``start..L-1``, named by what it swaps."""

    order: tuple[int, ...]
    start: int
    i: int
    j: int


def swap(n_layers: int, i: int, j: int) -> Permutation:
    """Blocks ``i < j`` exchanged; resumes at layer ``i`` (everything before is unchanged)."""
    order = list(range(i, n_layers))
    order[0], order[j - i] = j, i
    return Permutation(tuple(order), i, i, j)


def window_permutations(n_layers: int, window: int, samples: int, seed: int) -> list[Permutation]:
    """Seeded random orders inside windows of ``window`` consecutive blocks (i, j: the window)."""
    gen = torch.Generator().manual_seed(seed)
    perms = []
    for _ in range(samples):
        start = int(torch.randint(0, n_layers - window + 1, (1,), generator=gen))
        inner = (torch.randperm(window, generator=gen) + start).tolist()
        perms.append(Permutation(tuple(inner + list(range(start + window, n_layers))), start,
                                 start, start + window - 1))
    return perms


class LensSpaceBlocks:
    """Blocks as maps of lens space; checks every translator is safely invertible."""

    def __init__(self, runner: BlockRunner, lens: TunedLens):
        self.runner, self.lens = runner, lens
        n, d = runner.adapter.n_layers, runner.adapter.d_model
        self.maps, self.inverses, self.conditions = [], [], []
        for layer in range(n):
            translator = lens.layer_translators[layer]
            m = torch.eye(d, dtype=torch.float64) + translator.weight.detach().double()
            condition = float(torch.linalg.cond(m))
            self.conditions.append(condition)
            if not condition < MAX_CONDITION:
                raise LensspaceError(
                    f"translator {layer} is not safely invertible (condition number of I + A is "
                    f"{condition:.3g} >= {MAX_CONDITION:g}): the lens-space shuffle needs T_i^-1. "
                    "Retrain the lens with a larger lens_training.ridge or drop space 'lens'"
                )
            self.maps.append((m, translator.bias.detach().double()))
            self.inverses.append(torch.linalg.inv(m))

    def to_lens(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``T_layer(h)``, computed in float64 (translators can be ill-conditioned)."""
        if layer == self.runner.adapter.n_layers:
            return h.double()
        m, b = self.maps[layer]
        return h.double() @ m.T + b

    def from_lens(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """``T_layer^-1(z)`` as a float32 residual for the block."""
        if layer == self.runner.adapter.n_layers:
            return z.float()
        _, b = self.maps[layer]
        return ((z.double() - b) @ self.inverses[layer].T).float()

    @torch.no_grad()
    def run(self, h: torch.Tensor, perm: Permutation) -> torch.Tensor:
        """The last residual after composing ``g_{order[k]}`` from ``z = T_start(h)``."""
        args, kwargs = self.runner.block_context(h.shape[0], h.shape[1])
        z = self.to_lens(h, perm.start)
        for block_index in perm.order:
            out = self.runner.adapter.blocks[block_index](self.from_lens(z, block_index), *args, **kwargs)
            z = self.to_lens(out[0] if isinstance(out, tuple) else out, block_index + 1)
        return z.float()  # T_L is the identity: this is the last residual


@torch.no_grad()
def measure(runner: BlockRunner, cache: ActivationCache, perms: list[Permutation],
            lens_blocks: LensSpaceBlocks | None, n_boot: int, seed: int, chunk: int = 4,
            n_sequences: int | None = None) -> list[dict]:
    """KL(p_model || p_permuted) and top-1 agreement for every order, in each space
    (on the first ``n_sequences`` held-out sequences; all by default).

    The reference is the model run from the same cached residual in its own order, so
    storage rounding of the cache cancels.
    """
    adapter = runner.adapter
    spaces = {"native": lambda h, perm: runner.run(h, perm.start, perm.order)}
    if lens_blocks is not None:
        spaces["lens"] = lens_blocks.run
    residual_at = {start: cache.load(start, "eval")[:n_sequences] for start in {p.start for p in perms}}
    rows = []
    for perm in perms:
        h = residual_at[perm.start]
        kls = {space: [] for space in spaces}
        agree = {space: [] for space in spaces}
        for first in range(0, len(h), chunk):
            hb = h[first: first + chunk]
            clean = adapter.logits(runner.run(hb, perm.start)[:, 1:]).log_softmax(-1)
            for space, run in spaces.items():
                permuted = adapter.logits(run(hb, perm)[:, 1:]).log_softmax(-1)
                kls[space].append(kl_from_logprobs(clean, permuted))
                agree[space].append((clean.argmax(-1) == permuted.argmax(-1)).double())
        for space in spaces:
            est = bootstrap_mean(torch.cat(kls[space]), n_boot=n_boot, seed=seed)
            rows.append({"i": perm.i, "j": perm.j, "space": space, "kl": est.mean, "kl_lo": est.lo,
                         "kl_hi": est.hi, "top1_agreement": float(torch.cat(agree[space]).mean()),
                         "n_tokens": est.n_tokens, "order": " ".join(map(str, perm.order))})
    return rows
