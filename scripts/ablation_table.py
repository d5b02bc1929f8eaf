"""An ablation experiment's table in the original study's layout, beside the published one."""

import json
from pathlib import Path

import pandas as pd

from lensspace import runtime
from lensspace.tables import load_reference, markdown, seed_layout


def body(sm):
    d_model = json.loads(Path(sm.input.model).read_text())["d_model"]
    ref_name = sm.params.reference_table
    reference = load_reference(sm.input.reference, ref_name) if ref_name else None
    ablation = pd.read_csv(sm.input.table, sep="\t")
    table = seed_layout(ablation, k=d_model // 2, site=sm.params.site, reference=reference)
    header = (
        f"# {sm.params.title} — {sm.wildcards.run}\n\n{sm.params.description}, "
        f"k = {d_model // 2} of {d_model} (d/2), basis unembed (raw W_U), zero ablation (the "
        "seed's; mean ablation beside it where the grid has it); "
        f"mean over {int(ablation['n_tokens'].iloc[0])} held-out tokens, 95% bootstrap "
        "interval over sequences."
    )
    if ref_name:
        header += f" Published: the seed study's table {ref_name}; Δ = reproduced − published."
    runtime.write_text(header + "\n\n" + markdown(table), sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
