"""Table and figure: lens KL and the seed-layout H0 cells in distribution and on every eval
corpus."""

import pandas as pd

from lensspace import runtime, tables
from lensspace.report.ood import LEGEND, comparison_table, plot


def body(sm):
    frames = {
        f"{sm.params.train_corpus} (in distribution)": (
            pd.read_csv(sm.input.lens_eval, sep="\t"),
            pd.read_csv(sm.input.h0, sep="\t"),
        )
    }
    for corpus, lens, ablation in zip(sm.params.corpora, sm.input.ood_lens, sm.input.ood_ablation):
        frames[corpus] = (pd.read_csv(lens, sep="\t"), pd.read_csv(ablation, sep="\t"))
    page = tables.document(
        f"Out of distribution, {sm.wildcards.run}", LEGEND, comparison_table(frames)
    )
    runtime.write_text(page, sm.output.markdown)
    plot(frames, f"{sm.wildcards.run}: in and out of distribution", sm.output.figure)


runtime.main(snakemake, body)  # noqa: F821
