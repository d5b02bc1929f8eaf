"""Run the model over the run's tokens and cache every layer's residual to disk."""

import json
from pathlib import Path

from safetensors.torch import load_file

from lensspace import runtime
from lensspace.activations import write_cache
from lensspace.devices import describe
from lensspace.sources import sha256_of


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    tokens = load_file(sm.input.tokens)
    meta = {
        "run": sm.wildcards.run,
        "tokens_sha256": sha256_of(Path(sm.input.tokens)),
        "model": json.loads(Path(sm.input.model).read_text()),
        "compute": describe(adapter.device),
    }
    meta = write_cache(
        adapter,
        tokens,
        Path(sm.output.cache),
        meta,
        batch_size=runtime.compute_settings(sm.params.compute).cache_batch(adapter.device),
        storage=sm.params.cache["storage"],
    )
    print(f"cached {meta['n_layers'] + 1} residuals at {meta['tokens_per_second']:.0f} tokens/s")


runtime.main(snakemake, body)  # noqa: F821
