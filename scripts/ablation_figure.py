"""An ablation experiment's figure: KL against layer per subspace, one panel per variant."""

import pandas as pd

from lensspace import runtime
from lensspace.plots import ablation_figure


def body(sm):
    frame = pd.read_csv(sm.input.table, sep="\t")
    title = (
        f"{sm.params.title} {sm.wildcards.run}: {sm.params.description}, "
        f"{frame['n_tokens'].iloc[0]} held-out tokens, 95% bootstrap bands"
    )
    ablation_figure(frame, title, sm.output.figure)


runtime.main(snakemake, body)  # noqa: F821
