"""H0 at one layer: the whole ablation grid in lens space, per sequence, and the norm shares."""
from pathlib import Path

from lensspace import runtime
from lensspace.experiments.grid import AblationGrid
from lensspace.experiments.h0 import norm_shares, run_layer
from lensspace.lenses import load_lens
from lensspace.subspaces import load_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    bases, layer = load_bases(sm.input.bases, adapter.device), int(sm.wildcards.layer)
    grid = AblationGrid(**sm.params.grid)
    results = run_layer(adapter, lens, cache, bases, layer, grid,
                        chunk=runtime.compute_settings(sm.params.compute).chunk(adapter.device))
    runtime.write_tsv(results.per_sequence(), sm.output.sequences)
    runtime.write_tsv(norm_shares(adapter, lens, cache, bases, layer, grid), sm.output.shares)
    runtime.write_tsv(results.rows(), sm.output.table)


runtime.main(snakemake, body)  # noqa: F821
