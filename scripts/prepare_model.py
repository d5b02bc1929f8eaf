"""Fetch or build one model into resources/models/{model}/."""

from pathlib import Path

from lensspace import runtime
from lensspace.models import prepare_model


def body(sm):
    manifest = prepare_model(
        sm.wildcards.model,
        dict(sm.params.spec),
        Path(sm.output.manifest).parent,
        Path(sm.params.download_dir),
    )
    print(
        f"prepared {manifest['model_type']} with {manifest['n_layers']} layers, "
        f"d_model {manifest['d_model']}, vocab {manifest['vocab_size']}"
    )


runtime.main(snakemake, body)  # noqa: F821
