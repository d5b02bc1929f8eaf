"""Out of distribution: the run's lens and the seed-layout H0 cells on corpora it never saw.

Each eval corpus is tokenized with the run's tokenizer and split by whole document: held-out
sequences (one per document, a window of ``seq_len`` tokens at a seeded offset within it, so a
file's opening docstring is no likelier than any other part of it) and, from other documents, the
sequences whose means the mean-mode cells use, so a mean ablation replaces a component by its mean
on the same kind of text. A corpus sharing a long token n-gram with the run's training tokens is
refused (:func:`check_disjoint`). On the held-out sequences: the tuned and the logit lens's
KL(p_final || p_lens) and the H0 cells (unembed basis, k = d/2, pre_norm) with the random
control. Output minus internal per sequence is tested by the exact sign test ("the median
difference is 0": nominal size at any number of sequences, for any continuous distribution),
its p-value Holm-corrected over the corpus's (layer, mode) comparisons; the interval is the
paired bootstrap-t one of the mean difference.
"""

from __future__ import annotations

import io
import math
import tempfile
import tokenize
from dataclasses import dataclass
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
from lensspace.robustness import CORRECTION, verdict
from lensspace.stats import Comparison, adjust, paired_difference, sign_test_p
from lensspace.subspaces import Basis


@dataclass(frozen=True)
class Sample:
    """An eval corpus's sequences: ``tokens`` ``eval`` (held out) and ``train`` (for the means),
    and per held-out sequence its document, token offset and character span."""

    tokens: dict[str, torch.Tensor]
    rows: list[dict]


def sample_tokens(
    docs: list[str], tokenizer, seq_len: int, n_eval: int, n_mean: int, seed: int
) -> Sample:
    """Held-out windows at seeded offsets of ``n_eval`` documents, then ``n_mean`` sequences from
    the other documents (a stream, as a training split)."""
    try:
        held_out = split_documents(docs, tokenizer, TokenSplit(seq_len, 0, n_eval, seed))
        others = [i for i in range(len(docs)) if i not in set(held_out.documents["eval"])]
        rest = split_documents(
            [docs[i] for i in others], tokenizer, TokenSplit(seq_len, n_mean, 0, seed)
        )
    except LensspaceError as error:
        raise LensspaceError(
            f"an eval corpus is too small for ood.eval_sequences {n_eval} (one document each, "
            f"at least {seq_len} tokens) and ood.mean_sequences {n_mean} from its other "
            f"documents: lower them or use more text ({error})"
        ) from None
    gen = torch.Generator().manual_seed(seed)
    windows, rows = [], []
    for sequence, document in enumerate(held_out.documents["eval"]):
        encoded = tokenizer(docs[document], add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        start = int(torch.randint(len(ids) - seq_len + 1, (1,), generator=gen))
        windows.append(ids[start : start + seq_len])
        rows.append(
            {
                "sequence": sequence,
                "document": document,
                "token_offset": start,
                "char_start": offsets[start][0],
                "char_end": offsets[start + seq_len - 1][1],
            }
        )
    tokens = {"train": rest.tokens["train"], "eval": torch.tensor(windows, dtype=torch.int32)}
    return Sample(tokens, rows)


def docstring_comment_mask(source: str) -> torch.Tensor | None:
    """Per character of Python ``source``: inside a comment or a docstring (a string literal that
    is a statement of its own); None where the source does not tokenize."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    mask = torch.zeros(len(source), dtype=torch.bool)
    skip = {tokenize.NL, tokenize.COMMENT}
    statement_start = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, None}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    significant = [t for t in tokens if t.type not in skip]
    for t in tokens:
        if t.type == tokenize.COMMENT:
            mask[starts[t.start[0] - 1] + t.start[1] : starts[t.end[0] - 1] + t.end[1]] = True
    for i, t in enumerate(significant):
        before = significant[i - 1].type if i else None
        after = significant[i + 1].type if i + 1 < len(significant) else tokenize.ENDMARKER
        if (
            t.type == tokenize.STRING
            and before in statement_start
            and after in (tokenize.NEWLINE, tokenize.ENDMARKER)
        ):
            mask[starts[t.start[0] - 1] + t.start[1] : starts[t.end[0] - 1] + t.end[1]] = True
    return mask


def docstring_comment_shares(docs: list[str], rows: list[dict]) -> tuple[list[float], float]:
    """The docstring-and-comment share of each held-out window's characters, and of the whole
    corpus's (documents that do not tokenize count in neither: NaN for their windows)."""
    masks = {i: docstring_comment_mask(doc) for i, doc in enumerate(docs)}
    marked = sum(int(m.sum()) for m in masks.values() if m is not None)
    total = sum(len(m) for m in masks.values() if m is not None)
    windows = []
    for row in rows:
        mask = masks[row["document"]]
        part = None if mask is None else mask[row["char_start"] : row["char_end"]]
        windows.append(float(part.double().mean()) if part is not None and len(part) else math.nan)
    return windows, marked / total if total else math.nan


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


def compare_ablations(
    a: torch.Tensor, b: torch.Tensor, n_resamples: int, seed: int
) -> tuple[Comparison, float]:
    """Paired comparison of per-sequence values ``a`` and ``b``: the bootstrap-t interval of the
    mean difference, and the exact sign test's p-value of "the median difference is 0" (nominal
    size at any number of sequences, where the bootstrap-t test of the mean is liberal at Holm's
    levels)."""
    return paired_difference(a, b, n_resamples, seed), sign_test_p(a - b)


def evaluate(
    adapter: Adapter,
    lens: TunedLens,
    tokens: dict[str, torch.Tensor],
    bases: dict[str, Basis],
    layers: list[int],
    grid: AblationGrid,
    test_resamples: int,
    storage: str = "float16",
) -> tuple[list[dict], list[dict], list[dict]]:
    """lens_eval.tsv rows, ablation.tsv rows and per_sequence.tsv rows on ``tokens["eval"]`` (means
    from ``tokens["train"]``), at ``layers``."""
    with tempfile.TemporaryDirectory() as folder:
        write_cache(adapter, tokens, Path(folder) / "cache", {}, storage=storage)
        cache = ActivationCache(Path(folder) / "cache", device=adapter.device)
        lens_rows = evaluate_lens(adapter, lens, cache, grid.n_boot, grid.seed, layers=layers)
        ablation, sequences, tests = [], [], []
        for layer in layers:
            results = h0.run_layer(adapter, lens, cache, bases, layer, grid)
            rows = results.rows()
            per_seq = {cell: torch.cat(parts).mean(1) for cell, parts in results.kl.items()}
            for mode in grid.modes:

                def cell_mean(subspace: str) -> torch.Tensor:
                    return torch.stack(
                        [v for c, v in per_seq.items() if c.subspace == subspace and c.mode == mode]
                    ).mean(0)

                comp, p = compare_ablations(
                    cell_mean("output"), cell_mean("internal"), test_resamples, grid.seed
                )
                tests.append((comp, p, [row for row in rows if row["mode"] == mode]))
            ablation += rows
            sequences += results.per_sequence()
        adjusted = adjust([p for _, p, _ in tests], CORRECTION)
        for (comp, p, rows), p_adjusted in zip(tests, adjusted):
            for row in rows:
                row.update(
                    {
                        "output_minus_internal": comp.diff,
                        "output_minus_internal_lo": comp.lo,
                        "output_minus_internal_hi": comp.hi,
                        "p_value": p,
                        "p_adjusted": p_adjusted,
                        "verdict": verdict(comp.diff, p_adjusted),
                    }
                )
    return lens_rows, ablation, sequences
