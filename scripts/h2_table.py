"""H2 table: embedding-lens quality and the KL of ablating W_E's directions, per layer."""

import pandas as pd

from lensspace import runtime
from lensspace.experiments.h2 import TIED_NOTE
from lensspace.tables import embedding_lens_table, markdown


def body(sm):
    fit, ablation = pd.read_csv(sm.input.fit, sep="\t"), pd.read_csv(sm.input.table, sep="\t")
    table, k = embedding_lens_table(fit, ablation)
    header = (
        f"# H2 — {sm.wildcards.run}: embedding lenses E_i (token embedding -> layer i)\n\n"
        "R² = held-out share of h_i's variance that E_i explains; route KLs = held-out "
        "KL(model || E_i route) in nats, through the tuned lens T_i or by running the rest of "
        "the model (position 0 keeps the model's own layer-i residual); "
        f"ablation KLs = KL(E_i route || route with k = {k} directions of W_E's SVD "
        "zero-ablated at E_i's input) in nats (input = top-k, bottom = bottom-k, random = "
        f"seeded control); {int(fit['n_tokens'].iloc[0])} held-out tokens."
    )
    if fit["embed_tied_to_unembed"].all():
        header += " " + TIED_NOTE
    runtime.write_text(header + "\n\n" + markdown(table), sm.output.markdown)


runtime.main(snakemake, body)  # noqa: F821
