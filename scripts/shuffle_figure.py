"""Swap-cost heatmaps: native and the lens spaces side by side on one colour scale."""

import json
from pathlib import Path

import pandas as pd

from lensspace import runtime
from lensspace.plots import swap_heatmaps


def body(sm):
    n_layers = json.loads(Path(sm.input.model).read_text())["n_layers"]
    swaps = pd.read_csv(sm.input.table, sep="\t")
    swap_heatmaps(
        swaps[swaps["kind"] == "swap"],
        n_layers,
        f"{sm.wildcards.run}: KL(model || blocks i, j swapped), nats",
        sm.output.figure,
    )


runtime.main(snakemake, body)  # noqa: F821
