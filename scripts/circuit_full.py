"""EAP-IG over every edge of the model's graph for one task: scores, circuit, faithfulness curve
and cost."""

from pathlib import Path

import pandas as pd
from safetensors.torch import save_file

from lensspace import runtime
from lensspace.experiments.circuit_search import (
    GraphRunner,
    SearchSettings,
    budget_edges,
    circuit_rows,
    full_search,
    task_prompts,
)


def body(sm):
    adapter, tokenizer = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    runner = GraphRunner(adapter)
    prompts = task_prompts(
        runner, tokenizer, sm.wildcards.task, sm.params.settings, sm.params.seed,
        pd.read_csv(sm.input.prompts, sep="\t"),
    )  # fmt: skip
    settings = SearchSettings.from_params(sm.params.settings, sm.params.seed)
    scores, result = full_search(runner, prompts, settings)
    runtime.write_tsv(result.metrics, sm.output.metrics)
    runtime.write_tsv(result.costs, sm.output.costs)
    runtime.write_tsv(result.anchors, sm.output.anchors)
    n_edges = budget_edges(runner.graph, 0.01)
    runtime.write_tsv(circuit_rows(runner.graph, scores, n_edges), sm.output.circuit)
    tensors = {"edges": scores.edges, "plain": scores.plain, "allowed": scores.allowed}
    partial = Path(sm.output.edges + ".partial")
    save_file({key: t.contiguous() for key, t in tensors.items()}, str(partial))
    partial.replace(sm.output.edges)


runtime.main(snakemake, body)  # noqa: F821
