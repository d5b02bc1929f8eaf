"""H2 at a job's layers: fit the embedding lens E_i, its held-out quality, and the input
ablations."""

from pathlib import Path

from lensspace import runtime
from lensspace.experiments.grid import AblationGrid
from lensspace.experiments.h2 import (
    EmbeddingLensSettings,
    embedding_basis,
    embeddings_tied,
    evaluate_layers,
    fit_embedding_lenses,
)
from lensspace.lenses import load_lens
from lensspace.runner import BlockRunner
from lensspace.settings import job_layers


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    runner, grid, basis = (
        BlockRunner(adapter),
        AblationGrid(**sm.params.grid),
        embedding_basis(adapter),
    )
    chunk = runtime.compute_settings(sm.params.compute).chunk(adapter.device)
    settings = EmbeddingLensSettings(**sm.params.settings)
    emb_lenses = fit_embedding_lenses(runner, lens, cache, job_layers(sm.wildcards.layer), settings)
    fits, rows, sequences = [], [], []
    for fit, results in evaluate_layers(
        runner, lens, cache, emb_lenses, basis, grid, chunk=chunk
    ).values():
        fit["embed_tied_to_unembed"] = embeddings_tied(adapter)
        fits.append(fit)
        rows += results.rows()
        sequences += results.per_sequence()
    runtime.write_tsv(fits, sm.output.fit)
    runtime.write_tsv(sequences, sm.output.sequences)
    runtime.write_tsv(rows, sm.output.table)


runtime.main(snakemake, body)  # noqa: F821
