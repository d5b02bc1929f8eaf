"""The searches cut down to a fraction of the nodes for one task: by the study's labels, by a
per-task attribution pass and at random, each with its faithfulness curve, recall and cost."""

import pandas as pd
from safetensors.torch import load_file

from lensspace import runtime
from lensspace.experiments.circuit_search import (
    GraphRunner,
    Scores,
    SearchSettings,
    cost_of,
    labels_from_table,
    restricted_searches,
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
    saved = load_file(sm.input.edges)
    costs = pd.read_csv(sm.input.costs, sep="\t").set_index("method")
    full = Scores(
        saved["edges"],
        saved["allowed"],
        cost_of(costs.loc["full"].to_dict()),
        saved["plain"],
        cost_of(costs.loc["node_attribution"].to_dict()),
    )
    labels = labels_from_table(runner.graph, pd.read_csv(sm.input.labels, sep="\t"))
    fraction = float(sm.wildcards.fraction)
    result = restricted_searches(
        runner, prompts, settings, fraction, labels, full, desc=f"{sm.wildcards.task} {fraction}"
    )
    runtime.write_tsv(result.metrics, sm.output.metrics)
    runtime.write_tsv(result.costs, sm.output.costs)
    runtime.write_tsv(result.recall, sm.output.recall)


runtime.main(snakemake, body)  # noqa: F821
