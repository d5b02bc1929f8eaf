"""Figure: the last block's null-space shares against norm, and mediated shares."""

import pandas as pd

from lensspace import runtime
from lensspace.report.neurons import plot


def body(sm):
    neurons = pd.read_csv(sm.input.neurons, sep="\t")
    reference = pd.read_csv(sm.input.reference, sep="\t")
    plot(
        neurons,
        reference,
        f"{sm.wildcards.run}: entropy neurons of the last block",
        sm.output.figure,
    )


runtime.main(snakemake, body)  # noqa: F821
