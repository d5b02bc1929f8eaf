"""Tokenize the run's corpus into disjoint train/eval sequences (int32 safetensors)."""
import json
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoTokenizer

from lensspace import runtime
from lensspace.corpus import read_documents, tokenize_documents
from lensspace.sources import sha256_of


def body(sm):
    split = sm.params.split
    tokenizer = AutoTokenizer.from_pretrained(Path(sm.input.model).parent)
    tokens = tokenize_documents(read_documents(Path(sm.input.corpus)), tokenizer, split)
    save_file(tokens, sm.output.tokens)
    meta = {"split": vars(split), "shapes": {k: list(v.shape) for k, v in tokens.items()},
            "corpus_sha256": sha256_of(Path(sm.input.corpus)),
            "tokens_sha256": sha256_of(Path(sm.output.tokens))}
    runtime.write_text(json.dumps(meta, indent=2, sort_keys=True), sm.output.meta)
    print(json.dumps(meta["shapes"]))


runtime.main(snakemake, body)  # noqa: F821
