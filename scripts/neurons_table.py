"""Markdown table of the last block's measured neurons and their entropy-neuron test."""

import pandas as pd

from lensspace import runtime, tables
from lensspace.report.neurons import legend, measured_table


def body(sm):
    measured = pd.read_csv(sm.input.measured, sep="\t")
    page = tables.document(
        f"Entropy neurons, {sm.wildcards.run}",
        legend(measured, sm.params.config),
        measured_table(measured),
        digits=4,
    )
    runtime.write_text(page, sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
