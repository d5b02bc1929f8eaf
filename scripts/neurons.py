"""Single MLP neurons: geometry of every neuron, candidates, their causal test, the reference
check."""

from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from lensspace import runtime
from lensspace.experiments.h1 import PULLED_BACK
from lensspace.experiments.neurons import reference_matches, run_neurons
from lensspace.lenses import load_lens
from lensspace.settings import neuron_settings
from lensspace.subspaces import load_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    settings = neuron_settings(sm.params.config, adapter.n_layers, adapter.d_model)
    table, candidates, joint = run_neurons(
        adapter,
        lens,
        cache,
        load_bases(sm.input.bases)[PULLED_BACK].vectors,
        load_file(sm.input.tokens),
        settings,
    )
    reference = pd.read_csv(sm.input.reference, sep="\t", comment="#")
    matches = reference_matches(
        candidates, table, reference[reference["reference"] == sm.params.reference]
    )
    runtime.write_tsv(table, sm.output.neurons)
    runtime.write_tsv(candidates, sm.output.candidates)
    runtime.write_tsv(joint, sm.output.joint)
    runtime.write_tsv(matches.assign(reference=sm.params.reference), sm.output.reference)


runtime.main(snakemake, body)  # noqa: F821
