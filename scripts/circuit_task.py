"""A circuit task's prompts and the model's accuracy on them, before any circuit work."""

import torch

from lensspace import runtime
from lensspace.experiments.circuit_search import prompt_rows
from lensspace.experiments.circuit_tasks import TaskSettings, make_task


def body(sm):
    adapter, tokenizer = runtime.open_model(sm.input.model, "cpu")
    settings = TaskSettings.from_params(sm.params.settings, sm.params.seed)
    task = make_task(sm.wildcards.task, tokenizer, adapter.unembedding.shape[0], settings)
    with torch.no_grad():
        clean = adapter.model(adapter.to_device(task.clean), use_cache=False).logits[:, -1]
        corrupt = adapter.model(adapter.to_device(task.corrupt), use_cache=False).logits[:, -1]
    runtime.write_tsv(prompt_rows(task, clean.float(), corrupt.float()), sm.output.prompts)


runtime.main(snakemake, body)  # noqa: F821
