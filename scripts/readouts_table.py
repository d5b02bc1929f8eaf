"""Table and figure of every readout of a run."""

import pandas as pd

from lensspace import runtime, tables
from lensspace.report.readouts import LEGEND, cell_table, plot, summary_table


def body(sm):
    def read(paths):
        return pd.concat([pd.read_csv(p, sep="\t") for p in paths], ignore_index=True)

    summary, fidelity = read(sm.input.summary), read(sm.input.fidelity)
    ablation, verdicts = read(sm.input.ablation), read(sm.input.verdicts)
    corpus = fidelity["corpus"].iloc[0]  # the run's own corpus comes first
    page = tables.document(f"Readouts, {sm.wildcards.run}", LEGEND, summary_table(summary))
    page += "\n" + tables.markdown(cell_table(fidelity, ablation, verdicts, corpus)) + "\n"
    runtime.write_text(page, sm.output.markdown)
    plot(summary, fidelity, verdicts, corpus, f"{sm.wildcards.run}: readouts", sm.output.figure)


runtime.main(snakemake, body)  # noqa: F821
