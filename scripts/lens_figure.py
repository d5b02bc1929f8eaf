"""Lens quality figure: held-out KL of the tuned and the logit lens by layer."""

import pandas as pd

from lensspace import runtime
from lensspace.plots import lens_quality_figure


def body(sm):
    frame = pd.read_csv(sm.input.table, sep="\t")
    lens_quality_figure(
        frame,
        f"{sm.wildcards.run}: lens quality, {frame['n_tokens'].iloc[0]} held-out tokens",
        sm.output.figure,
    )


runtime.main(snakemake, body)  # noqa: F821
