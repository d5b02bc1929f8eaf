"""H0 at a job's layers: the whole ablation grid in lens space, per sequence, and the norm
shares."""

import sys
from pathlib import Path

from lensspace import runtime
from lensspace.experiments.grid import AblationGrid
from lensspace.experiments.h0 import norm_shares, run_layer
from lensspace.lenses import load_lens
from lensspace.settings import job_layers
from lensspace.subspaces import load_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    bases, grid = load_bases(sm.input.bases, adapter.device), AblationGrid(**sm.params.grid)
    chunk = runtime.compute_settings(sm.params.compute).chunk(adapter.device)
    rows, sequences, shares = [], [], []
    for layer in job_layers(sm.wildcards.layer):
        results = run_layer(adapter, lens, cache, bases, layer, grid, chunk=chunk)
        rows += results.rows()
        sequences += results.per_sequence()
        shares += norm_shares(adapter, lens, cache, bases, layer, grid)
        print(f"layer {layer} done", file=sys.stderr)
    runtime.write_tsv(sequences, sm.output.sequences)
    runtime.write_tsv(shares, sm.output.shares)
    runtime.write_tsv(rows, sm.output.table)


runtime.main(snakemake, body)  # noqa: F821
