"""An eval corpus tokenized with the run's tokenizer: held-out sequences only, checked disjoint from
training."""

from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from lensspace import runtime
from lensspace.corpus import read_documents
from lensspace.experiments.ood import check_disjoint, eval_tokens


def body(sm):
    tokenizer = AutoTokenizer.from_pretrained(Path(sm.input.model).parent)
    ids = eval_tokens(
        read_documents(Path(sm.input.corpus)),
        tokenizer,
        sm.params.seq_len,
        sm.params.ood["eval_sequences"],
        sm.params.seed,
    )
    check_disjoint(
        sm.wildcards.corpus, ids, load_file(sm.input.train)["train"], sm.params.ood["overlap_ngram"]
    )
    Path(sm.output.tokens).parent.mkdir(parents=True, exist_ok=True)
    partial = Path(sm.output.tokens).with_suffix(".partial")
    save_file({"eval": ids.contiguous()}, str(partial))
    partial.replace(sm.output.tokens)
    print(f"{tuple(ids.shape)} held-out sequences of {sm.wildcards.corpus}")


runtime.main(snakemake, body)  # noqa: F821
