"""Concatenate per-job TSVs (same columns) into one per named output, in input order.

Each output is built from the input of the same name (e.g. input.table -> output.table).
"""

import pandas as pd

from lensspace import runtime


def body(sm):
    for name in sm.output.keys():
        runtime.write_tsv(
            pd.concat([pd.read_csv(p, sep="\t") for p in sm.input[name]]), sm.output[name]
        )


runtime.main(snakemake, body)  # noqa: F821
