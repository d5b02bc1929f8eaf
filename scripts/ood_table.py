"""Table and figure: lens KL and the seed-layout H0 cells in distribution and on every eval
corpus."""

import pandas as pd

from lensspace import runtime, tables
from lensspace.plots import ood_figure


def body(sm):
    frames = {
        f"{sm.params.train_corpus} (in distribution)": (
            pd.read_csv(sm.input.lens_eval, sep="\t"),
            pd.read_csv(sm.input.h0, sep="\t"),
        )
    }
    for corpus, lens, ablation in zip(sm.params.corpora, sm.input.ood_lens, sm.input.ood_ablation):
        frames[corpus] = (pd.read_csv(lens, sep="\t"), pd.read_csv(ablation, sep="\t"))
    legend = (
        "Held-out KL(p_final ‖ p_lens) of the tuned and logit lens, and the seed-layout H0 cells "
        "(unembed "
        "basis, k = d/2, pre_norm): KL of ablating the output, internal and random subspace; "
        "output − internal "
        "with its paired 95% bootstrap-t interval over the eval corpus's sequences, and its "
        "verdict, Holm-corrected "
        "over the corpus's layers and modes."
    )
    page = tables.document(
        f"Out of distribution, {sm.wildcards.run}", legend, tables.ood_table(frames)
    )
    runtime.write_text(page, sm.output.markdown)
    ood_figure(frames, f"{sm.wildcards.run}: in and out of distribution", sm.output.figure)


runtime.main(snakemake, body)  # noqa: F821
