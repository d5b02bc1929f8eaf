"""H1 at a job's layers: the ablation grid in the residual stream, resumed from the cache."""

from pathlib import Path

from lensspace import runtime
from lensspace.experiments.grid import AblationGrid
from lensspace.experiments.h1 import run_layers
from lensspace.lenses import load_lens
from lensspace.runner import BlockRunner
from lensspace.settings import job_layers
from lensspace.subspaces import load_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    runner, bases = BlockRunner(adapter), load_bases(sm.input.bases, adapter.device)
    chunk = runtime.compute_settings(sm.params.compute).chunk(adapter.device)
    grid = AblationGrid(**sm.params.grid)
    rows, sequences = [], []
    for results in run_layers(
        runner, lens, cache, bases, job_layers(sm.wildcards.layer), grid, chunk=chunk
    ).values():
        rows += results.rows()
        sequences += results.per_sequence()
    runtime.write_tsv(sequences, sm.output.sequences)
    runtime.write_tsv(rows, sm.output.table)


runtime.main(snakemake, body)  # noqa: F821
