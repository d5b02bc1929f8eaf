"""Table and figure of a run's per-node lenses."""

import pandas as pd

from lensspace import runtime, tables
from lensspace.report.nodes import (
    LEGEND,
    induction_table,
    node_table,
    plot,
    rank_table,
    summary_table,
)


def body(sm):
    scores = pd.read_csv(sm.input.scores, sep="\t")
    comparisons = pd.read_csv(sm.input.comparisons, sep="\t")
    ranks = pd.read_csv(sm.input.ranks, sep="\t")
    induction = pd.read_csv(sm.input.induction, sep="\t")
    page = tables.document(f"Nodes, {sm.wildcards.run}", LEGEND, summary_table(scores))
    for frame in (rank_table(ranks), induction_table(induction), node_table(scores, comparisons)):
        page += "\n" + tables.markdown(frame) + "\n"
    runtime.write_text(page, sm.output.markdown)
    plot(scores, f"{sm.wildcards.run}: per-node lenses", sm.output.figure)


runtime.main(snakemake, body)  # noqa: F821
