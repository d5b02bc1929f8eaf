"""Layer-shuffle invariance: how much does the model's output depend on the order of blocks?

``native``: run the blocks in a permuted order. ``lens``: wrap every block as a map of lens
space, ``g_i(z) = T_{i+1}(f_i(T_i^{-1}(z)))`` with ``f_i(h) = h + block_i(h)`` and ``T_L`` the
identity, and compose the wrapped blocks in the permuted order (the "modularised layers").
Position 0 is never translated (the translators were fitted without it): it runs through the
same permuted blocks in the native residual stream, and the other positions attend to it there.
``lens_ridge``: the same with a second lens fitted by least squares at a larger ridge, to show
how much the lens-space result is a property of the translators' conditioning.
In the native order every space gives the model's own output exactly.

The *distortion* of an order in a lens space is what the wrapper does to the input of the first
block it runs, ``b = order[0]``, resuming from the residual ``h`` at layer ``s = start``: the
mean over evaluated tokens of ``||T_b^{-1}(T_s(h)) - h|| / ||h||``. Natively block ``b``
would receive ``h`` itself; a distortion above 1 means the lens-space wrapper moves the block's
input by more than its own norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.divergences import KLReference
from lensspace.errors import LensspaceError
from lensspace.runner import BlockRunner, recording
from lensspace.stats import bootstrap_mean

# T_i^-1 is applied in float64, where a condition number up to this loses at most ~4 digits.
MAX_CONDITION = 1e12

# translator_dominated: a lens-space swap "measures the translators" when the wrapper moves the
# first block's input by more than its norm and the swap costs this many times the native one.
DOMINATED_DISTORTION = 1.0
DOMINATED_KL_RATIO = 10.0


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
        perms.append(
            Permutation(
                tuple(inner + list(range(start + window, n_layers))),
                start,
                start,
                start + window - 1,
            )
        )
    return perms


class LensSpaceBlocks:
    """Blocks as maps of lens space; checks every translator is safely invertible.

    ``ridge`` is only a label for the tables: the ridge the lens was fitted with, if known.
    """

    def __init__(self, runner: BlockRunner, lens: TunedLens, ridge: float | None = None):
        self.runner, self.lens, self.ridge = runner, lens, ridge
        n, d = runner.adapter.n_layers, runner.adapter.d_model
        self.maps, self.inverses, self.conditions = [], [], []
        for layer in range(n):
            translator = lens.layer_translators[layer]
            m = (
                torch.eye(d, dtype=torch.float64, device=translator.weight.device)
                + translator.weight.detach().double()
            )
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
        return self._inverse(z, layer).float()

    def _inverse(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        if layer == self.runner.adapter.n_layers:
            return z.double()
        _, b = self.maps[layer]
        return (z.double() - b) @ self.inverses[layer].T

    def distortion(self, h: torch.Tensor, perm: Permutation) -> torch.Tensor:
        """Per evaluated token, ``||T_b^-1(T_s(h)) - h|| / ||h||`` for the first block ``b`` of
        the order and its start ``s``: how far the wrapper moves that block's input ([batch,
        pos-1])."""
        h = h[:, 1:].double()
        moved = self._inverse(self.to_lens(h, perm.start), perm.order[0])
        return (moved - h).norm(dim=-1) / h.norm(dim=-1)

    @torch.no_grad()
    def run(self, h: torch.Tensor, perm: Permutation) -> torch.Tensor:
        """The last residual after composing ``g_{order[k]}`` from ``z = T_start(h)`` at
        positions ``1:``; position 0 runs the same blocks natively, untranslated.

        Where block ``b + 1`` follows block ``b``, ``g_{b+1} g_b`` contains
        ``T_{b+1}^-1 T_{b+1}``, which cancels exactly: the residual is translated only where
        the order jumps, and kept in the coordinates of ``at``, the layer it belongs to.
        """
        first, x, at = h[:, :1], h[:, 1:], perm.start
        for block_index in perm.order:
            if block_index != at:
                x = self.from_lens(self.to_lens(x, at), block_index)
            out = self.runner.call_block(block_index, torch.cat([first, x], dim=1))
            first, x, at = out[:, :1], out[:, 1:], block_index + 1
        return torch.cat([first, self.to_lens(x, at).float()], dim=1)  # T_L is the identity


@torch.no_grad()
def measure(
    runner: BlockRunner,
    cache: ActivationCache,
    perms: list[Permutation],
    lens_spaces: Mapping[str, LensSpaceBlocks],
    n_boot: int,
    seed: int,
    chunk: int = 4,
    n_sequences: int | None = None,
) -> list[dict]:
    """KL(p_model || p_permuted) and top-1 agreement for every order, natively and in each
    lens space of ``lens_spaces`` (name -> blocks), with each lens space's ``distortion`` and
    ``ridge`` (on the first ``n_sequences`` held-out sequences; all by default).

    One native pass from the cached residual at the earliest start gives every order its
    starting residual (in float32, as the model computes it) and the reference output for all
    of them: no storage rounding lies between the reference and a permuted run, the identity
    order reproduces the reference logits exactly, and the reference costs one pass per job instead
    of one per order.
    """
    adapter = runner.adapter
    spaces = {"native": lambda h, perm: runner.run(h, perm.start, perm.order)}
    spaces.update({name: blocks.run for name, blocks in lens_spaces.items()})
    starts = {p.start for p in perms}
    root = min(starts)
    residuals = cache.load(root, "eval")[:n_sequences]
    kls = [{space: [] for space in spaces} for _ in perms]
    agree = [{space: [] for space in spaces} for _ in perms]
    distortion = [{space: [] for space in lens_spaces} for _ in perms]
    for first in range(0, len(residuals), chunk):
        start_residual: dict[int, torch.Tensor] = {}
        final = runner.run(
            residuals[first : first + chunk], root, interventions=recording(start_residual, starts)
        )
        clean_logits = adapter.logits(final[:, 1:])
        clean_top = clean_logits.argmax(
            -1
        )  # of the logits on both sides (log_softmax can merge ties)
        clean = KLReference.from_logits(clean_logits)  # an unchanged output: KL exactly 0 (fused)
        for n, perm in enumerate(perms):
            hb = start_residual[perm.start]
            for space, run in spaces.items():
                permuted = adapter.logits(run(hb, perm)[:, 1:])
                agree[n][space].append((clean_top == permuted.argmax(-1)).double())
                kls[n][space].append(clean.kl(permuted))
            for space, blocks in lens_spaces.items():
                distortion[n][space].append(blocks.distortion(hb, perm))
    rows = []
    for n, perm in enumerate(perms):
        for space in spaces:
            est = bootstrap_mean(torch.cat(kls[n][space]), n_boot=n_boot, seed=seed)
            blocks = lens_spaces.get(space)
            rows.append(
                {
                    "i": perm.i,
                    "j": perm.j,
                    "space": space,
                    "kl": est.mean,
                    "kl_lo": est.lo,
                    "kl_hi": est.hi,
                    "top1_agreement": float(torch.cat(agree[n][space]).mean()),
                    "n_tokens": est.n_tokens,
                    "order": " ".join(map(str, perm.order)),
                    "distortion": float(torch.cat(distortion[n][space]).mean()) if blocks else None,
                    "ridge": blocks.ridge if blocks else None,
                }
            )
    return rows


def translator_dominated(swaps: pd.DataFrame) -> str | None:
    """A plain statement for the report where lens-space swaps measure the translators rather
    than the model, from the adjacent swaps of ``swaps.tsv``; None where no lens space does.

    A lens space is dominated when, over the adjacent pairs measured in it and natively, the
    median distortion exceeds DOMINATED_DISTORTION (the wrapper moves the first block's input
    by more than its norm) and the median swap KL exceeds the native one DOMINATED_KL_RATIO times.
    """
    kinds = swaps["kind"] if "kind" in swaps else pd.Series("swap", index=swaps.index)
    adjacent = swaps[(kinds == "swap") & (swaps["j"] == swaps["i"] + 1)]
    native = adjacent[adjacent["space"] == "native"].set_index("i")
    if native.empty or "distortion" not in adjacent:
        return None
    findings, dominated = [], False
    for space, part in adjacent[adjacent["space"] != "native"].groupby("space", sort=False):
        part = part.set_index("i")
        pairs = part.index.intersection(native.index)
        if pairs.empty:
            continue
        kl, native_kl = part.loc[pairs, "kl"].median(), native.loc[pairs, "kl"].median()
        distortion = part.loc[pairs, "distortion"].median()
        ratio = kl / native_kl if native_kl > 0 else float("inf")
        hit = distortion > DOMINATED_DISTORTION and ratio > DOMINATED_KL_RATIO
        dominated |= hit
        ridge = part["ridge"].iloc[0] if "ridge" in part else float("nan")
        lens = f"the {space} space" + (f" (lens ridge {ridge:g})" if pd.notna(ridge) else "")
        findings.append(
            f"in {lens} the median adjacent swap costs {kl:.3g} nats (native {native_kl:.3g}; "
            f"{ratio:.3g} times as much) and keeps the top-1 token "
            f"{part.loc[pairs, 'top1_agreement'].median():.2f} "
            f"of the time (native {native.loc[pairs, 'top1_agreement'].median():.2f}), while the "
            f"wrapper moves the first swapped block's input by a median {distortion:.3g} times its "
            f"own norm ({'dominated' if hit else 'not dominated'})"
        )
    if not dominated:
        return None
    return (
        "Lens-space swaps here measure the translators rather than the model. Over "
        f"{len(native)} adjacent pairs: " + "; ".join(findings) + ". Natively an adjacent "
        "swap hands block j the residual h that block i would have read; in lens space it "
        "hands it T_j^-1(T_i(h)), and where that differs from h by more than h itself the "
        "swap cost is the cost of feeding a block a residual it never sees, set by how "
        "ill-conditioned the translators I + A are, not by how much the blocks depend on "
        "their order. Read the native swap costs as the model's layer-order dependence."
    )
