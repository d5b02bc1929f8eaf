"""Circuit ends: induction score and lens-space output/internal write shares of every head and
MLP."""

from pathlib import Path

from safetensors.torch import load_file

from lensspace import runtime
from lensspace.experiments.circuits import (
    head_and_mlp_fractions,
    induction_scores,
    layer_permutation_test,
)
from lensspace.lenses import load_lens
from lensspace.settings import circuit_settings
from lensspace.subspaces import load_bases


def body(sm):
    adapter, tokenizer = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    settings = circuit_settings(sm.params.settings, adapter.d_model)
    ids = adapter.to_device(load_file(sm.input.tokens)["eval"])
    heads, mlps = head_and_mlp_fractions(
        adapter,
        lens,
        load_bases(sm.input.bases, adapter.device),
        ids,
        settings.k,
        chunk=runtime.compute_settings(sm.params.compute).chunk(adapter.device),
    )
    scores = induction_scores(adapter, settings, len(tokenizer))
    flags = scores > settings.induction_threshold
    runtime.write_tsv(
        [
            {
                "layer": layer,
                "head": head,
                "induction_score": float(scores[layer, head]),
                "output_fraction": float(heads.output[layer, head]),
                "internal_fraction": float(heads.internal[layer, head]),
                "is_induction": bool(flags[layer, head]),
                "k": settings.k,
                "n_tokens": int(ids[:, 1:].numel()),
                "write_norm": float(heads.write_norm[layer, head]),
                "lens_write_norm": float(heads.lens_write_norm[layer, head]),
            }
            for layer in range(adapter.n_layers)
            for head in range(adapter.n_heads)
        ],
        sm.output.heads,
    )
    runtime.write_tsv(
        [
            {
                "layer": layer,
                "output_fraction": float(mlps.output[layer]),
                "internal_fraction": float(mlps.internal[layer]),
                "k": settings.k,
                "write_norm": float(mlps.write_norm[layer]),
                "lens_write_norm": float(mlps.lens_write_norm[layer]),
            }
            for layer in range(adapter.n_layers)
        ],
        sm.output.mlp,
    )
    test = layer_permutation_test(
        heads.output, flags, settings.n_permutations, sm.params.n_boot, settings.seed
    )
    runtime.write_tsv(
        [
            {
                "hypothesis": "induction heads write a larger lens-space share into the output "
                "subspace than the other heads of their layer",
                "threshold": settings.induction_threshold,
                **test,
            }
        ],
        sm.output.test,
    )
    print(test)


runtime.main(snakemake, body)  # noqa: F821
