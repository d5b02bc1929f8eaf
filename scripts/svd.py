"""SVD bases of the unembedding and their spectra."""

from lensspace import runtime
from lensspace.subspaces import save_bases, unembedding_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model)
    bases = unembedding_bases(adapter)
    save_bases(bases, sm.output.bases)
    rows = [
        {"basis": name, "index": i, "singular_value": float(s)}
        for name, basis in bases.items()
        for i, s in enumerate(basis.singular_values)
    ]
    runtime.write_tsv(rows, sm.output.spectrum)


runtime.main(snakemake, body)  # noqa: F821
