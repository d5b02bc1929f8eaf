"""One eval corpus: the run's lens KL per layer and the seed-layout H0 cells on it."""

from pathlib import Path

from safetensors.torch import load_file

from lensspace import runtime
from lensspace.experiments.ood import evaluate
from lensspace.lenses import load_lens
from lensspace.settings import seed_layout_grid, seed_layout_layers
from lensspace.subspaces import load_bases


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    config = sm.params.config
    lens_rows, ablation, sequences = evaluate(
        adapter,
        lens,
        load_file(sm.input.tokens),
        load_bases(sm.input.bases),
        seed_layout_layers(config, "ood", sm.params.n_layers),
        seed_layout_grid(config, "ood"),
        config["bootstrap"]["test_resamples"],
        sm.params.storage,
    )
    runtime.write_tsv(lens_rows, sm.output.lens_eval)
    runtime.write_tsv(sequences, sm.output.sequences)
    runtime.write_tsv(ablation, sm.output.ablation)


runtime.main(snakemake, body)  # noqa: F821
