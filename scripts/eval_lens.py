"""Held-out KL(final || lens) per layer, tuned lens and logit lens, with bootstrap intervals."""

from pathlib import Path

from lensspace import runtime
from lensspace.lenses import evaluate_lens, load_lens


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    rows = evaluate_lens(
        adapter,
        lens,
        cache,
        n_boot=sm.params.n_boot,
        seed=sm.params.seed,
        chunk=runtime.compute_settings(sm.params.compute).chunk(adapter.device),
    )
    runtime.write_tsv(rows, sm.output.table)


runtime.main(snakemake, body)  # noqa: F821
