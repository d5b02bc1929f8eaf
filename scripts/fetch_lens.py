"""Load a pretrained tuned-lens lens (hub id or folder) and save it as the run's lens."""
from pathlib import Path

from lensspace import runtime
from lensspace.lenses import load_lens, save_lens


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model)
    save_lens(load_lens(adapter, sm.params.lens_id), Path(sm.output.params).parent)


runtime.main(snakemake, body)  # noqa: F821
