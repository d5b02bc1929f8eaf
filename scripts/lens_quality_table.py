"""Markdown table of the lens-quality sweep: lens KL and the H0 verdict per budget and layer."""

import pandas as pd

from lensspace import runtime, tables

LEGEND = (
    "Held-out KL(p_final ‖ p_lens) of lenses trained at each budget, and the seed-layout H0 cell "
    "(unembed "
    "basis, k = d/2, pre_norm): KL of ablating the output and internal subspace, their paired "
    "difference "
    "output − internal over held-out sequences with its 95% bootstrap-t interval; the verdict "
    "needs the "
    "p-value Holm-corrected over the sweep (`p (Holm)`) below 0.05."
)


def body(sm):
    table = tables.lens_budget_table(pd.read_csv(sm.input.sweep, sep="\t"))
    page = tables.document(
        f"Lens quality against the H0 verdict, {sm.wildcards.run}", LEGEND, table
    )
    runtime.write_text(page, sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
