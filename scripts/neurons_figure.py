"""Figure: every MLP neuron's internal share against its norm, candidates marked."""

import pandas as pd

from lensspace import runtime
from lensspace.plots import neurons_figure


def body(sm):
    neurons = pd.read_csv(sm.input.neurons, sep="\t")
    reference = pd.read_csv(sm.input.reference, sep="\t")
    neurons_figure(
        neurons, reference, f"{sm.wildcards.run}: MLP neurons in lens space", sm.output.figure
    )


runtime.main(snakemake, body)  # noqa: F821
