"""H2 at one layer: fit the embedding lens E_i, its held-out quality, and the input ablations."""
from pathlib import Path

from lensspace import runtime
from lensspace.experiments.grid import AblationGrid
from lensspace.experiments.h2 import (EmbeddingLensSettings, embedding_basis, embeddings_tied,
                                      evaluate_layer, fit_embedding_lens)
from lensspace.lenses import load_lens
from lensspace.runner import BlockRunner


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    runner, layer, grid = BlockRunner(adapter), int(sm.wildcards.layer), AblationGrid(**sm.params.grid)
    emb_lens = fit_embedding_lens(runner, lens, cache, layer, EmbeddingLensSettings(**sm.params.settings))
    fit, results = evaluate_layer(runner, lens, cache, layer, emb_lens, embedding_basis(adapter), grid,
                                 chunk=runtime.compute_settings(sm.params.compute).chunk(adapter.device))
    fit["embed_tied_to_unembed"] = embeddings_tied(adapter)
    runtime.write_tsv([fit], sm.output.fit)
    runtime.write_tsv(results.per_sequence(), sm.output.sequences)
    runtime.write_tsv(results.rows(), sm.output.table)


runtime.main(snakemake, body)  # noqa: F821
