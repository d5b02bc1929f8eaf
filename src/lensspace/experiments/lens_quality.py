"""Lens quality against the H0 verdict: does output > internal appear only above some lens quality?

The run's lens is retrained at several budgets (least squares on the first fraction of the
training sequences, with and without the KL refinement), only at the H0 layers. Each lens is
evaluated on the held-out tokens (KL(p_final || p_lens)) and runs the seed-layout H0 cells
(output and internal subspace of the raw unembedding, k = d/2, pre_norm, zero and mean modes)
and the random control. The verdict is the paired output-minus-internal difference over the
held-out sequences (bootstrap-t), its p-value Holm-corrected over every (budget, layer, mode)
point of the sweep.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.divergences import KLReference
from lensspace.experiments import h0
from lensspace.experiments.grid import AblationGrid
from lensspace.lenses import LensTraining, fit_lens, held_out_sequences, translate
from lensspace.robustness import ALPHA, CORRECTION, HOLDS, REVERSED, verdict
from lensspace.settings import seed_layout_grid, seed_layout_layers
from lensspace.stats import adjust, bootstrap_mean, paired_difference
from lensspace.subspaces import Basis


@dataclass(frozen=True)
class LensQualitySettings:
    """Budgets (fractions of the training sequences; refinement off / on) and the H0 cells run."""

    fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)
    refine: tuple[bool, ...] = (False, True)
    layers: tuple[int, ...] = (0,)
    grid: AblationGrid = AblationGrid(
        bases=("unembed",), sites=("pre_norm",), experiment="lens_quality"
    )
    test_resamples: int = 20000

    @classmethod
    def from_config(cls, config: dict, n_layers: int) -> LensQualitySettings:
        """The config's ``lens_quality`` block; its cells at its layers (default: H0's)."""
        section = config["lens_quality"]
        return cls(
            fractions=tuple(section["fractions"]),
            refine=tuple(section["refine"]),
            layers=tuple(seed_layout_layers(config, "lens_quality", n_layers)),
            grid=seed_layout_grid(config, "lens_quality"),
            test_resamples=config["bootstrap"]["test_resamples"],
        )


class TrainSubset:
    """An activation cache seen through its first ``n_train`` training sequences (eval
    unchanged)."""

    def __init__(self, cache: ActivationCache, n_train: int):
        self.cache, self.n_train = cache, n_train
        self.n_layers = cache.n_layers

    def load(self, layer: int, split: str) -> torch.Tensor:
        x = self.cache.load(layer, split)
        return x[: self.n_train] if split == "train" else x

    def final(self, split: str) -> torch.Tensor:
        return self.load(self.n_layers, split)


def budget_label(fraction: float, refine: bool) -> str:
    """``1/8 lstsq``, ``all lstsq+kl``, ...: the budget as configured."""
    share = "all" if fraction == 1 else str(Fraction(fraction).limit_denominator(64))
    return f"{share} {'lstsq+kl' if refine else 'lstsq'}"


def trained_label(fraction: float, refine: bool, kept: bool | None) -> str:
    """What a layer's lens is: ``1/8 lstsq``, ``1/8 lstsq+kl``, or ``1/8 lstsq, kl reverted``
    (least squares on the tokens the refinement's check left, where the check reverted it);
    ``kept`` None: no refinement ran (no steps, or too few sequences to check it)."""
    if refine and kept is None:
        return budget_label(fraction, False)
    label = budget_label(fraction, refine)
    return label.replace("lstsq+kl", "lstsq, kl reverted") if refine and not kept else label


@torch.no_grad()
def held_out_kl(
    adapter: Adapter, lens: TunedLens, cache: ActivationCache, layer: int, chunk: int = 4
) -> torch.Tensor:
    """Per held-out sequence: mean KL(p_final || p_lens) at ``layer`` over positions 1.. [n_seq]."""
    final, h = cache.final("eval"), cache.load(layer, "eval")
    parts = []
    for start in range(0, len(h), chunk):
        reference = KLReference(adapter.logits(final[start : start + chunk, 1:]).log_softmax(-1))
        z = translate(lens, h[start : start + chunk, 1:], layer)
        parts.append(reference.kl(adapter.logits(z)).double().mean(1))
    return torch.cat(parts)


def _per_sequence(results, subspace: str, mode: str) -> torch.Tensor:
    """[n_seq] mean KL of one H0 cell (random: averaged over its draws)."""
    cells = [c for c in results.kl if c.subspace == subspace and c.mode == mode]
    return torch.stack([torch.cat(results.kl[c]).mean(1) for c in cells]).mean(0)


def sweep(
    adapter: Adapter,
    cache: ActivationCache,
    bases: dict[str, Basis],
    training: LensTraining,
    settings: LensQualitySettings,
    run_lens_trained: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Rows of sweep.tsv (budget x layer x mode) and of per_sequence.tsv.

    ``run_lens_trained``: the run's own lens was trained here with ``training``; the budget of
    every training sequence with the run's refinement setting then is that lens (each layer's fit
    and refinement are seeded per layer, whatever other layers are trained)."""
    grid = settings.grid
    points = len(settings.fractions) * len(settings.refine) * len(settings.layers) * len(grid.modes)
    # the smallest bootstrap p-value stays a quarter of Holm's first threshold
    resamples = max(settings.test_resamples, math.ceil(8 * points / ALPHA))
    n_train = len(cache.load(0, "train"))
    k = grid.resolve_k(adapter.d_model)[0]
    n_eval, seq_len = cache.load(0, "eval").shape[:2]
    n_tokens = n_eval * (seq_len - 1)
    # whether the run's own lens is refined: steps to take and sequences to check them on
    refines = bool(training.refine_steps) and bool(held_out_sequences(n_train, seq_len, training))
    rows, sequences = [], []
    for fraction in settings.fractions:
        n = max(2, round(fraction * n_train))
        for refine in settings.refine:
            label = budget_label(fraction, refine)
            lens_settings = dataclasses.replace(
                training, refine_steps=training.refine_steps if refine else 0
            )
            print(f"budget {label}: {n} of {n_train} training sequences", flush=True)
            fit = fit_lens(
                adapter, TrainSubset(cache, n), lens_settings, label, layers=settings.layers
            )
            lens = fit.lens
            n_fit = n - len(held_out_sequences(n, seq_len, lens_settings))
            keys = {
                "budget": label,
                "fraction": fraction,
                "refine": refine,
                "train_tokens": n * (seq_len - 1),
                "lstsq_tokens": n_fit * (seq_len - 1),
                # without a refinement of its own, the run's lens equals both full budgets
                "run_lens": run_lens_trained
                and n == n_train
                and (refine == refines or not refines),
            }
            for layer in settings.layers:
                kept = fit.refinement_kept.get(layer) if refine else None
                keys["refine_kept"] = kept
                keys["trained"] = trained_label(fraction, refine, kept)
                lens_kl = held_out_kl(adapter, lens, cache, layer)
                est = bootstrap_mean(lens_kl, grid.n_boot, grid.seed)
                results = h0.run_layer(adapter, lens, cache, bases, layer, grid)
                for mode in grid.modes:
                    out, internal = (
                        _per_sequence(results, "output", mode),
                        _per_sequence(results, "internal", mode),
                    )
                    random = _per_sequence(results, "random", mode)
                    comp = paired_difference(out, internal, resamples, grid.seed)
                    rand = paired_difference(random, internal, resamples, grid.seed)
                    rows.append(
                        {
                            **keys,
                            "layer": layer,
                            "mode": mode,
                            "k": k,
                            "basis": "unembed",
                            "site": "pre_norm",
                            "lens_kl": est.mean,
                            "lens_kl_lo": est.lo,
                            "lens_kl_hi": est.hi,
                            "kl_output": comp.mean_a,
                            "kl_internal": comp.mean_b,
                            "kl_random": rand.mean_a,
                            "diff": comp.diff,
                            "diff_lo": comp.lo,
                            "diff_hi": comp.hi,
                            "p_value": comp.p_value,
                            "random_minus_internal": rand.diff,
                            "random_minus_internal_lo": rand.lo,
                            "random_minus_internal_hi": rand.hi,
                            "n_draws": grid.random_draws,
                            "n_tokens": n_tokens,
                        }
                    )
                    for s, values in enumerate(
                        zip(lens_kl.tolist(), out.tolist(), internal.tolist(), random.tolist())
                    ):
                        sequences.append(
                            {
                                **keys,
                                "layer": layer,
                                "mode": mode,
                                "sequence": s,
                                "lens_kl": values[0],
                                "kl_output": values[1],
                                "kl_internal": values[2],
                                "kl_random": values[3],
                            }
                        )
    for row, p in zip(rows, adjust([row["p_value"] for row in rows], CORRECTION)):
        row["p_adjusted"] = p
        row["verdict"] = LABELS.get(verdict(row["diff"], p), "not separable")
    return rows, sequences


LABELS = {HOLDS: "output > internal", REVERSED: "internal > output"}
