"""The eval corpora's residuals at the layers the run's readouts read (none: an empty file)."""

from pathlib import Path

from safetensors.torch import load_file, save_file

from lensspace import runtime
from lensspace.experiments.readouts import corpus_residuals


def body(sm):
    tensors = {}
    if sm.params.corpora:
        adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
        for corpus, path in zip(sm.params.corpora, sm.input.tokens):
            done = corpus_residuals(adapter, load_file(path), sm.params.layers)
            tensors.update({f"{corpus}/{key}": value for key, value in done.items()})
    partial = Path(sm.output.residuals + ".partial")
    save_file(tensors, str(partial))
    partial.replace(sm.output.residuals)


runtime.main(snakemake, body)  # noqa: F821
