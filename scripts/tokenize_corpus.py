"""Tokenize the run's corpus into train/eval sequences split by document (int32 safetensors).

The meta JSON records which documents (0-based lines of the prepared corpus) went to each
split, in stream order, and which documents each sequence spans, so the split can be audited.
"""

import json
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoTokenizer

from lensspace import runtime
from lensspace.corpus import TokenSplit, read_documents, split_documents
from lensspace.sources import sha256_of


def body(sm):
    split = TokenSplit(**sm.params.split)
    tokenizer = AutoTokenizer.from_pretrained(Path(sm.input.model).parent)
    result = split_documents(read_documents(Path(sm.input.corpus)), tokenizer, split)
    save_file(result.tokens, sm.output.tokens)
    meta = {
        "split": vars(split),
        "shapes": {k: list(v.shape) for k, v in result.tokens.items()},
        "documents": result.documents,
        "sequence_documents": result.sequence_documents,
        "corpus_sha256": sha256_of(Path(sm.input.corpus)),
        "tokens_sha256": sha256_of(Path(sm.output.tokens)),
    }
    runtime.write_text(json.dumps(meta, indent=2, sort_keys=True), sm.output.meta)
    counts = {f"{split}_documents": len(docs) for split, docs in result.documents.items()}
    print(json.dumps({**meta["shapes"], **counts}))


runtime.main(snakemake, body)  # noqa: F821
