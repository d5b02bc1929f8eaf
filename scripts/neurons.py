"""Single MLP neurons: the geometry of every neuron, and the entropy-neuron test of the last
block's candidates, largest-norm and published neurons against their matched neurons."""

from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from lensspace import runtime
from lensspace.errors import LensspaceError
from lensspace.experiments.h1 import PULLED_BACK
from lensspace.experiments.neurons import NeuronSettings, reference_matches, run_neurons
from lensspace.lenses import load_lens
from lensspace.subspaces import load_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    settings = NeuronSettings.from_config(sm.params.config, adapter.d_model)
    reference = pd.read_csv(sm.input.reference, sep="\t", comment="#")
    reference = reference[reference["reference"] == sm.params.reference]
    others = set(reference["model"]) - {sm.params.model}
    if others:
        raise LensspaceError(
            f"runs.{sm.wildcards.run}.reference.neurons: {sm.params.reference} lists neurons of "
            f"{', '.join(sorted(others))}, the run's model is {sm.params.model}: drop the key or "
            "name a list for this model"
        )
    last = adapter.n_layers - 1
    table, measured = run_neurons(
        adapter,
        lens,
        cache,
        load_bases(sm.input.bases)[PULLED_BACK].vectors,
        load_file(sm.input.tokens),
        settings,
        published=reference.loc[reference["layer"] == last, "neuron"],
    )
    matches = reference_matches(table, measured, reference)
    runtime.write_tsv(table, sm.output.neurons)
    runtime.write_tsv(measured, sm.output.measured)
    runtime.write_tsv(matches.assign(reference=sm.params.reference), sm.output.reference)


runtime.main(snakemake, body)  # noqa: F821
