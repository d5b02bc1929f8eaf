"""Concatenate per-job TSVs (same columns) into one, in input order."""
import pandas as pd

from lensspace import runtime


def body(sm):
    runtime.write_tsv(pd.concat([pd.read_csv(p, sep="\t") for p in sm.input.tables]), sm.output.table)


runtime.main(snakemake, body)  # noqa: F821
