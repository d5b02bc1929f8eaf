"""Table and figure of a run's circuit searches, every task side by side."""

import pandas as pd

from lensspace import runtime, tables
from lensspace.report.circuit_search import LEGEND, accuracy_table, answer, plot, search_table


def body(sm):
    tasks = sm.params.tasks
    prompts = {t: pd.read_csv(p, sep="\t") for t, p in zip(tasks, sm.input.prompts, strict=True)}
    summaries = {t: pd.read_csv(p, sep="\t") for t, p in zip(tasks, sm.input.summary, strict=True)}
    page = tables.document(f"Circuit search, {sm.wildcards.run}", LEGEND, accuracy_table(prompts))
    page += "\n" + answer(summaries) + "\n\n" + tables.markdown(search_table(summaries)) + "\n"
    runtime.write_text(page, sm.output.markdown)
    plot(
        summaries,
        f"{sm.wildcards.run}: circuit search cut down by ends and beginnings",
        sm.output.figure,
    )


runtime.main(snakemake, body)  # noqa: F821
