"""H2: token-embedding directions ablated at the embedding lens's input."""

from __future__ import annotations

import pandas as pd

from lensspace import tables
from lensspace.report import words
from lensspace.report.ablation import AblationExperiment
from lensspace.report.blocks import Table, Text
from lensspace.report.sections import Context, existing


def tied(fit: pd.DataFrame) -> bool:
    """Whether the model ties its token embedding to its unembedding (fit.tsv says)."""
    return "embed_tied_to_unembed" in fit and bool(fit["embed_tied_to_unembed"].astype(bool).all())


def embedding_lenses(run: str, files: dict, context: Context, ablation: pd.DataFrame) -> list:
    path = existing(files.get("fit"))
    if path is None:
        return []
    fit = pd.read_csv(path, sep="\t")
    table, k = tables.embedding_lens_table(fit, ablation)
    blocks = []
    if tied(fit):
        blocks.append(
            Text(
                f"Model '{context.spec(run)['model']}' ties its token embedding to its "
                "unembedding (W_E = W_U; embed_tied_to_unembed in h2/fit.tsv). H2's embedding "
                "basis, the right singular vectors of W_E, is therefore exactly H0's unembed "
                "basis: the input (top-k) and bottom-k ablations remove H0's output and internal "
                "directions, applied at E_i's input rather than at the lens output. They are a "
                "second view of the same basis, not evidence from an independent one."
            )
        )
    return blocks + [
        Table(
            table,
            (
                f"Embedding lenses E_i, {run}: R² = held-out share of h_i's variance that E_i "
                "explains; route KLs = held-out KL(p_model ‖ p via E_i) in nats, through the tuned "
                "lens T_i (lens route) or by running the rest of the model from E_i(e), with the "
                "model's own layer-i residual at position 0 (the attention sink, which E_i cannot "
                f"stand in for) (downstream route); ablation KLs at k = {k}: KL(p via E_i ‖ p via "
                "E_i with k directions of W_E's SVD ablated at E_i's input) (input = top-k, bottom "
                f"= bottom-k, random = seeded control); {words.tokens(fit)} held-out tokens."
            ),
            existing(files.get("table")),
        )
    ]


def tied_finding(run: str, files: dict, context: Context, ablation: pd.DataFrame) -> list:
    path = existing(files.get("fit"))
    if path is None or not tied(pd.read_csv(path, sep="\t")):
        return []
    return [
        "H2: this model ties W_E to W_U, so the embedding basis of H2 is H0's unembedding "
        'basis: its "circuit beginnings" are not measured in an independent basis.'
    ]


H2 = AblationExperiment(
    "h2",
    "H2: token-embedding directions ablated at the embedding lens's input",
    where="at the input of the embedding lens E_i (token embedding -> layer i), read through T_i",
    measure="KL(p via E_i ‖ p via E_i ablated)",
    site="embedding",
    basis="embed",
    seed_table=False,
    summary=embedding_lenses,
    more_findings=tied_finding,
    subspace_words=(
        ("output", "input (top-k right singular vectors of W_E)"),
        ("internal", "bottom-k right singular vectors of W_E"),
    ),
    names=(
        ("output", "top-k directions of W_E (the input subspace)"),
        ("internal", "bottom-k directions of W_E"),
    ),
)
section = H2.section
finding = H2.finding
