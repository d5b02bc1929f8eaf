"""Fetch and clean one corpus into resources/corpora/{corpus}.txt (a document per line)."""

from pathlib import Path

from lensspace import runtime
from lensspace.corpus import prepare_corpus


def body(sm):
    n = prepare_corpus(
        sm.wildcards.corpus,
        dict(sm.params.spec),
        Path(sm.output.text),
        Path(sm.params.download_dir),
    )
    print(f"wrote {n} documents")


runtime.main(snakemake, body)  # noqa: F821
