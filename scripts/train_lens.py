"""Train the run's tuned lens from the activation cache and save it in tuned-lens format."""

from pathlib import Path

from lensspace import runtime
from lensspace.lenses import LensTraining, save_lens, train_lens


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = train_lens(adapter, cache, LensTraining(**sm.params.training), name=sm.wildcards.run)
    save_lens(lens, Path(sm.output.params).parent)


runtime.main(snakemake, body)  # noqa: F821
