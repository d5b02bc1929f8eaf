"""Markdown table of the lens-quality sweep: lens KL and the H0 verdict per budget and layer."""
import pandas as pd

from lensspace import runtime, tables


def body(sm):
    sweep = pd.read_csv(sm.input.sweep, sep="\t")
    text = (f"# Lens quality against the H0 verdict, {sm.wildcards.run}\n\n"
            "Held-out KL(p_final ‖ p_lens) of lenses trained at each budget, and the seed-layout H0 cell "
            "(unembed basis, k = d/2, pre_norm): KL of ablating the output and internal subspace, their paired "
            "difference output − internal over held-out sequences, 95% bootstrap-t intervals.\n\n")
    runtime.write_text(text + tables.markdown(tables.lens_budget_table(sweep), digits=3) + "\n",
                       sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
