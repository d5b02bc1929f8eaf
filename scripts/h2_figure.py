"""H2 figure: where token-input directions still decide the prediction (circuit beginnings)."""

import pandas as pd

from lensspace import runtime
from lensspace.plots import embedding_lens_figure


def body(sm):
    fit, ablation = pd.read_csv(sm.input.fit, sep="\t"), pd.read_csv(sm.input.table, sep="\t")
    embedding_lens_figure(
        fit,
        ablation,
        f"H2 {sm.wildcards.run}: embedding lenses, "
        f"{int(fit['n_tokens'].iloc[0])} held-out tokens, 95% bands",
        sm.output.figure,
    )


runtime.main(snakemake, body)  # noqa: F821
