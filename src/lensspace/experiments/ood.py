"""Out of distribution: the run's lens and the seed-layout H0 cells on corpora it never saw.

Each eval corpus is tokenized with the run's tokenizer into held-out sequences (one per
document, the first ``seq_len`` tokens); a corpus sharing a long token n-gram with the run's
training tokens is refused (:func:`check_disjoint`). On those sequences: the tuned and the logit
lens's KL(p_final || p_lens) and the H0 cells (unembed basis, k = d/2,
pre_norm) with the random control, whose mean-mode means stay the in-distribution training means.
Output minus internal is a paired bootstrap-t comparison over the corpus's sequences, its
p-value Holm-corrected over the corpus's (layer, mode) comparisons.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache, write_cache
from lensspace.adapter import Adapter
from lensspace.corpus import TokenSplit, split_documents
from lensspace.errors import LensspaceError
from lensspace.experiments import h0
from lensspace.experiments.grid import AblationGrid
from lensspace.lenses import evaluate_lens
from lensspace.robustness import ALPHA, CORRECTION, verdict
from lensspace.stats import adjust, paired_difference
from lensspace.subspaces import Basis


def eval_tokens(
    docs: list[str], tokenizer, seq_len: int, n_sequences: int, seed: int
) -> torch.Tensor:
    """[n_sequences, seq_len] int32: the start of as many different documents (no train split)."""
    return split_documents(docs, tokenizer, TokenSplit(seq_len, 0, n_sequences, seed)).tokens[
        "eval"
    ]


def shared_ngrams(a: torch.Tensor, b: torch.Tensor, n: int) -> int:
    """How many token n-grams of the rows of ``a`` also occur in some row of ``b``."""

    def grams(rows: torch.Tensor) -> list[tuple[int, ...]]:
        return [tuple(row[i : i + n]) for row in rows.tolist() for i in range(len(row) - n + 1)]

    seen = set(grams(b))
    return sum(g in seen for g in grams(a))


def check_disjoint(corpus: str, ood: torch.Tensor, train: torch.Tensor, n: int) -> None:
    """Refuse an eval corpus whose sequences overlap the training tokens (an n-gram in common)."""
    shared = shared_ngrams(ood, train, n)
    if shared:
        raise LensspaceError(
            f"eval corpus '{corpus}' shares {shared} token {n}-grams with the run's training "
            "tokens: it is not out of distribution; remove it from the run's eval_corpora"
        )


class SplitCache:
    """The run's training split (its means) beside another corpus's held-out split."""

    def __init__(self, train: ActivationCache, eval_: ActivationCache):
        self.train, self.eval = train, eval_
        self.n_layers = train.n_layers

    def load(self, layer: int, split: str) -> torch.Tensor:
        return (self.train if split == "train" else self.eval).load(layer, split)

    def final(self, split: str) -> torch.Tensor:
        return self.load(self.n_layers, split)


def evaluate(
    adapter: Adapter,
    lens: TunedLens,
    run_cache: ActivationCache,
    ids: torch.Tensor,
    bases: dict[str, Basis],
    layers: list[int],
    grid: AblationGrid,
    test_resamples: int,
    storage: str = "float16",
) -> tuple[list[dict], list[dict], list[dict]]:
    """lens_eval.tsv rows, ablation.tsv rows and per_sequence.tsv rows on ``ids``, at ``layers``."""
    with tempfile.TemporaryDirectory() as folder:
        write_cache(adapter, {"eval": ids}, Path(folder) / "cache", {}, storage=storage)
        cache = SplitCache(
            run_cache, ActivationCache(Path(folder) / "cache", device=adapter.device)
        )
        lens_rows = evaluate_lens(adapter, lens, cache, grid.n_boot, grid.seed, layers=layers)
        ablation, sequences, tests = [], [], []
        # the smallest bootstrap p-value stays a quarter of Holm's first threshold
        test_resamples = max(test_resamples, math.ceil(8 * len(layers) * len(grid.modes) / ALPHA))
        for layer in layers:
            results = h0.run_layer(adapter, lens, cache, bases, layer, grid)
            rows = results.rows()
            per_seq = {cell: torch.cat(parts).mean(1) for cell, parts in results.kl.items()}
            for mode in grid.modes:

                def cell_mean(subspace: str) -> torch.Tensor:
                    return torch.stack(
                        [v for c, v in per_seq.items() if c.subspace == subspace and c.mode == mode]
                    ).mean(0)

                comp = paired_difference(
                    cell_mean("output"), cell_mean("internal"), test_resamples, grid.seed
                )
                tests.append((comp, [row for row in rows if row["mode"] == mode]))
            ablation += rows
            sequences += results.per_sequence()
        for (comp, rows), p in zip(tests, adjust([comp.p_value for comp, _ in tests], CORRECTION)):
            for row in rows:
                row.update(
                    {
                        "output_minus_internal": comp.diff,
                        "output_minus_internal_lo": comp.lo,
                        "output_minus_internal_hi": comp.hi,
                        "p_value": comp.p_value,
                        "p_adjusted": p,
                        "verdict": verdict(comp.diff, p),
                    }
                )
    return lens_rows, ablation, sequences
