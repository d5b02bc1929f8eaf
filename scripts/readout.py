"""One readout of a run: its labels, its fidelity on every corpus and its H0 cells."""

from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from lensspace import runtime
from lensspace.devices import move
from lensspace.experiments.readouts import (
    VERDICT_COLUMNS,
    Corpus,
    ReadoutSettings,
    ReadoutSpec,
    run_readout,
)
from lensspace.lenses import load_lens
from lensspace.subspaces import load_bases


def body(sm):
    adapter, tokenizer = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    config = sm.params.config
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    own = Corpus(sm.params.corpus, cache.load, load_file(sm.input.tokens))
    others = load_file(sm.input.residuals)
    corpora = [own] + [
        Corpus(
            name,
            lambda layer, split, name=name: move(others[f"{name}/{split}.{layer}"], adapter.device),
            {split: others[f"{name}/{split}.tokens"] for split in ("train", "eval")},
        )
        for name in sm.params.corpora
    ]
    result = run_readout(
        adapter,
        tokenizer,
        lens,
        ReadoutSpec.from_params(sm.wildcards.readout, sm.params.readout["spec"]),
        corpora,
        load_bases(sm.input.bases, adapter.device)["unembed_centered"],
        ReadoutSettings.from_params(sm.params.readout, config, own.tokens["train"].shape[1]),
    )
    runtime.write_tsv(result.fidelity, sm.output.fidelity)
    runtime.write_tsv(result.ablation, sm.output.ablation)
    runtime.write_tsv(pd.DataFrame(result.verdicts, columns=VERDICT_COLUMNS), sm.output.verdicts)
    runtime.write_tsv([result.summary], sm.output.summary)


runtime.main(snakemake, body)  # noqa: F821
