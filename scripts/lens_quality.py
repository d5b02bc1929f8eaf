"""Lens quality sweep: lenses at several budgets, their held-out KL and the seed-layout H0 cells."""

from lensspace import runtime
from lensspace.experiments.lens_quality import LensQualitySettings, sweep
from lensspace.lenses import LensTraining
from lensspace.subspaces import load_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    settings = LensQualitySettings.from_config(sm.params.config, sm.params.n_layers)
    rows, sequences = sweep(
        adapter,
        cache,
        load_bases(sm.input.bases),
        LensTraining(**sm.params.training),
        settings,
        run_lens_trained=sm.params.lens_source == "train",
    )
    runtime.write_tsv(sequences, sm.output.sequences)
    runtime.write_tsv(rows, sm.output.sweep)


runtime.main(snakemake, body)  # noqa: F821
