"""Every node of a job's blocks: exact total effects, each method's predictions, their sums."""

from pathlib import Path

from lensspace import runtime
from lensspace.experiments.h1 import PULLED_BACK
from lensspace.experiments.nodes import NodeSettings, run_layer
from lensspace.lenses import load_lens
from lensspace.runner import BlockRunner
from lensspace.settings import job_layers
from lensspace.subspaces import load_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    chunk = runtime.compute_settings(sm.params.compute).chunk(adapter.device)
    settings = NodeSettings.from_params(sm.params.settings, adapter.d_model, chunk, sm.params.seed)
    basis = load_bases(sm.input.bases, adapter.device)[PULLED_BACK].vectors
    runner, sums, fits = BlockRunner(adapter), [], []
    for layer in job_layers(sm.wildcards.layer):
        rows, described = run_layer(runner, lens, cache, basis, layer, settings)
        sums += rows
        fits += described
    runtime.write_tsv(sums, sm.output.sums)
    runtime.write_tsv(fits, sm.output.fits)


runtime.main(snakemake, body)  # noqa: F821
