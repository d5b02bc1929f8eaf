"""The original H0 table layout (k = d/2, basis unembed, zero, pre_norm), beside the published one."""
import json
from pathlib import Path

import pandas as pd

from lensspace import runtime
from lensspace.tables import load_reference, markdown, seed_layout


def body(sm):
    d_model = json.loads(Path(sm.input.model).read_text())["d_model"]
    ref_name = sm.params.reference_table
    reference = load_reference(sm.input.reference, ref_name) if ref_name else None
    table = seed_layout(pd.read_csv(sm.input.table, sep="\t"), k=d_model // 2, reference=reference)
    n_tokens = int(pd.read_csv(sm.input.table, sep="\t")["n_tokens"].iloc[0])
    header = (f"# H0 — {sm.params.run}: KL(lens || ablated lens), nats\n\n"
              f"Lens space, k = {d_model // 2} of {d_model} (d/2), basis unembed (raw W_U), "
              f"zero ablation before the final norm; mean over {n_tokens} held-out tokens, "
              "95% bootstrap interval over sequences.")
    if ref_name:
        header += f" Published: the seed study's table {ref_name}; Δ = reproduced − published."
    runtime.write_text(header + "\n\n" + markdown(table), sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
