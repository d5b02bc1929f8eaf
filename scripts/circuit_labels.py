"""Every node's task-independent labels: circuit end (output share of its write through the lens)
and circuit beginning (share of its read weights on the embedding's top directions)."""

import pandas as pd

from lensspace import runtime
from lensspace.experiments.circuit_search import ends_from_tables, graph_of, label_rows, read_shares


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, "cpu")
    graph = graph_of(adapter)
    ends = ends_from_tables(
        graph, pd.read_csv(sm.input.heads, sep="\t"), pd.read_csv(sm.input.mlp, sep="\t")
    )
    beginnings = read_shares(adapter, adapter.d_model // 2)
    runtime.write_tsv(label_rows(graph, ends, beginnings), sm.output.labels)


runtime.main(snakemake, body)  # noqa: F821
