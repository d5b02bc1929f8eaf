"""An eval corpus tokenized with the run's tokenizer: held-out windows and, from other documents,
the sequences for its own means; checked disjoint from training; where the corpus is Python
source, the docstring and comment share of the windows beside the corpus's."""

import math
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from lensspace import runtime
from lensspace.corpus import read_documents
from lensspace.experiments.ood import check_disjoint, docstring_comment_shares, sample_tokens


def body(sm):
    tokenizer = AutoTokenizer.from_pretrained(Path(sm.input.model).parent)
    docs = read_documents(Path(sm.input.corpus))
    ood = sm.params.ood
    sample = sample_tokens(
        docs,
        tokenizer,
        sm.params.seq_len,
        ood["eval_sequences"],
        ood["mean_sequences"],
        sm.params.seed,
    )
    train = load_file(sm.input.train)["train"]
    for split, ids in sample.tokens.items():
        check_disjoint(f"{sm.wildcards.corpus} ({split})", ids, train, ood["overlap_ngram"])
    if sm.params.source == "python-stdlib":
        windows, corpus = docstring_comment_shares(docs, sample.rows)
    else:
        windows, corpus = [math.nan] * len(sample.rows), math.nan
    rows = [
        {**row, "docstring_comment_share": share, "corpus_docstring_comment_share": corpus}
        for row, share in zip(sample.rows, windows)
    ]
    Path(sm.output.tokens).parent.mkdir(parents=True, exist_ok=True)
    partial = Path(sm.output.tokens).with_suffix(".partial")
    save_file({split: ids.contiguous() for split, ids in sample.tokens.items()}, str(partial))
    partial.replace(sm.output.tokens)
    runtime.write_tsv(rows, sm.output.sample)
    print(
        f"{sm.wildcards.corpus}: {tuple(sample.tokens['eval'].shape)} held-out windows, "
        f"{tuple(sample.tokens['train'].shape)} sequences for the means"
    )


runtime.main(snakemake, body)  # noqa: F821
