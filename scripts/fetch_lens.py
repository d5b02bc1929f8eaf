"""Load a pretrained tuned-lens lens (hub id or folder), refuse one made for another model,
and save it as the run's lens."""

import json
from pathlib import Path

from lensspace import runtime
from lensspace.lenses import check_lens_origin, load_lens, resolve_pretrained, save_lens


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model)
    manifest = json.loads(Path(sm.input.model).read_text())
    folder = resolve_pretrained(sm.params.lens_id)
    names = [manifest["name"], manifest["spec"].get("id"), str(Path(sm.input.model).parent)]
    print(check_lens_origin(adapter, folder, names, sm.params.allow_other_model))
    save_lens(load_lens(adapter, folder), Path(sm.output.params).parent)


runtime.main(snakemake, body)  # noqa: F821
