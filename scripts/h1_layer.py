"""H1 at one layer: the ablation grid in the residual stream, resumed from the cache."""
from pathlib import Path

from lensspace import runtime
from lensspace.experiments.grid import AblationGrid
from lensspace.experiments.h1 import run_layer
from lensspace.lenses import load_lens
from lensspace.runner import BlockRunner
from lensspace.subspaces import load_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    results = run_layer(BlockRunner(adapter), lens, cache, load_bases(sm.input.bases, adapter.device),
                        int(sm.wildcards.layer), AblationGrid(**sm.params.grid),
                        chunk=runtime.compute_settings(sm.params.compute).chunk(adapter.device))
    runtime.write_tsv(results.per_sequence(), sm.output.sequences)
    runtime.write_tsv(results.rows(), sm.output.table)


runtime.main(snakemake, body)  # noqa: F821
