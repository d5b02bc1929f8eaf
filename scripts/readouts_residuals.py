"""The eval corpora's residuals at the layers the run's readouts read (none: an empty file)."""

from pathlib import Path

from safetensors.torch import load_file, save_file

from lensspace import runtime
from lensspace.experiments.readouts import ReadoutSpec, corpus_residuals, needed_layers
from lensspace.settings import seed_layout_layers


def body(sm):
    tensors = {}
    if sm.params.corpora:
        adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
        config = sm.params.config
        specs = [ReadoutSpec.from_config(config, name) for name in sm.params.readouts]
        layers = needed_layers(
            specs, seed_layout_layers(config, "readouts", sm.params.n_layers), sm.params.n_layers
        )
        for corpus, path in zip(sm.params.corpora, sm.input.tokens):
            done = corpus_residuals(adapter, load_file(path), layers)
            tensors.update({f"{corpus}/{key}": value for key, value in done.items()})
    partial = Path(sm.output.residuals + ".partial")
    save_file(tensors, str(partial))
    partial.replace(sm.output.residuals)


runtime.main(snakemake, body)  # noqa: F821
