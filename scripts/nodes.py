"""Scores across a run's nodes: R² and KL per method, the node lens against each baseline, rank
correlations, and the induction-head test on output shares."""

import pandas as pd

from lensspace import runtime
from lensspace.experiments.nodes import comparison_rows, induction_rows, rank_rows, score_rows


def body(sm):
    sums = pd.concat([pd.read_csv(path, sep="\t") for path in sm.input.sums], ignore_index=True)
    fits = pd.concat([pd.read_csv(path, sep="\t") for path in sm.input.fits], ignore_index=True)
    n_boot, seed = sm.params.n_boot, sm.params.seed
    scores = score_rows(sums, n_boot, seed)
    heads = pd.read_csv(sm.input.heads, sep="\t")
    runtime.write_tsv(scores, sm.output.scores)
    runtime.write_tsv(comparison_rows(sums, n_boot, seed, sm.params.margin), sm.output.comparisons)
    runtime.write_tsv(rank_rows(sums, n_boot, seed), sm.output.ranks)
    runtime.write_tsv(
        induction_rows(scores, heads, sm.params.n_permutations, n_boot, seed), sm.output.induction
    )
    runtime.write_tsv(fits, sm.output.fits)


runtime.main(snakemake, body)  # noqa: F821
