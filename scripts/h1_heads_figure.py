"""Circuit ends figure: induction score against output fraction, coloured by layer."""

import pandas as pd

from lensspace import runtime
from lensspace.plots import heads_figure


def body(sm):
    heads = pd.read_csv(sm.input.heads, sep="\t")
    test = pd.read_csv(sm.input.test, sep="\t").iloc[0]
    heads_figure(heads, test, f"{sm.wildcards.run}: circuit ends", sm.output.figure)


runtime.main(snakemake, body)  # noqa: F821
