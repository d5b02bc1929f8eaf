"""Markdown table of the entropy-neuron candidates and their causal test."""

import pandas as pd

from lensspace import runtime, tables

LEGEND = (
    "Mean ablation of each candidate alone; 95% bootstrap intervals over held-out sequences; "
    "`random`: random "
    "neurons of the same layer and matched norm (mean over draws); `diff`: paired difference "
    "candidate − "
    "random; a verdict holds when the Holm-corrected p-value (over every comparison of the "
    "experiment) is "
    "below 0.05 and the candidate lies beyond every matched draw."
)


def body(sm):
    table = tables.neuron_candidates_table(pd.read_csv(sm.input.candidates, sep="\t"))
    page = tables.document(
        f"Entropy-neuron candidates, {sm.wildcards.run}", LEGEND, table, digits=4
    )
    runtime.write_text(page, sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
