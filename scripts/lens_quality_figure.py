"""Figure: output-minus-internal KL (the H0 verdict) against the lens's held-out KL."""

import pandas as pd

from lensspace import runtime
from lensspace.report.lens_quality import plot


def body(sm):
    sweep = pd.read_csv(sm.input.sweep, sep="\t")
    plot(sweep, f"{sm.wildcards.run}: H0 verdict against lens quality", sm.output.figure)


runtime.main(snakemake, body)  # noqa: F821
