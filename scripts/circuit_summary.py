"""One task's searches compared: faithfulness per budget and search, areas, compute and recall."""

import pandas as pd

from lensspace import runtime
from lensspace.experiments.circuit_search import summarise


def _concat(paths) -> pd.DataFrame:
    return pd.concat([pd.read_csv(path, sep="\t") for path in paths], ignore_index=True)


def body(sm):
    faithfulness, summary = summarise(
        pd.read_csv(sm.input.anchors, sep="\t"),
        _concat([sm.input.full_metrics, *sm.input.metrics]),
        _concat([sm.input.full_costs, *sm.input.costs]),
        _concat(sm.input.recall),
        sm.params.n_boot,
        sm.params.seed,
    )
    runtime.write_tsv(faithfulness, sm.output.faithfulness)
    runtime.write_tsv(summary, sm.output.summary)


runtime.main(snakemake, body)  # noqa: F821
