"""Markdown table of the lens-quality sweep: lens KL and the H0 verdict per budget and layer."""

import pandas as pd

from lensspace import runtime, tables
from lensspace.report.lens_quality import LEGEND, budget_table


def body(sm):
    table = budget_table(pd.read_csv(sm.input.sweep, sep="\t"))
    page = tables.document(
        f"Lens quality against the H0 verdict, {sm.wildcards.run}", LEGEND, table
    )
    runtime.write_text(page, sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
