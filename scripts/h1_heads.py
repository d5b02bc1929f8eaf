"""Circuit ends: induction score and output/internal write fractions of every head and MLP."""
from pathlib import Path

from safetensors.torch import load_file

from lensspace import runtime
from lensspace.experiments.circuits import (depth_bins, head_and_mlp_fractions, induction_scores,
                                            permutation_test)
from lensspace.lenses import load_lens
from lensspace.settings import circuit_settings
from lensspace.subspaces import load_bases


def body(sm):
    adapter, tokenizer = runtime.open_model(sm.input.model, sm.params.device)
    lens = load_lens(adapter, Path(sm.input.lens).parent)
    settings = circuit_settings(sm.params.config, adapter.d_model)
    ids = load_file(sm.input.tokens)["eval"].to(adapter.embed.weight.device)
    (head_out, head_int), (mlp_out, mlp_int) = head_and_mlp_fractions(
        adapter, lens, load_bases(sm.input.bases), ids, settings.k)
    scores = induction_scores(adapter, settings, len(tokenizer))
    flags = scores > settings.induction_threshold
    heads = [{"layer": layer, "head": head, "induction_score": float(scores[layer, head]),
              "output_fraction": float(head_out[layer, head]),
              "internal_fraction": float(head_int[layer, head]),
              "is_induction": bool(flags[layer, head]), "k": settings.k,
              "n_tokens": int(ids[:, 1:].numel())}
             for layer in range(adapter.n_layers) for head in range(adapter.n_heads)]
    runtime.write_tsv(heads, sm.output.heads)
    runtime.write_tsv([{"layer": layer, "output_fraction": float(mlp_out[layer]),
                        "internal_fraction": float(mlp_int[layer]), "k": settings.k}
                       for layer in range(adapter.n_layers)], sm.output.mlp)
    bins = depth_bins(adapter.n_layers, settings.depth_bins)[:, None].expand_as(scores)
    test = permutation_test(head_out, flags, bins, settings.n_permutations, settings.seed)
    runtime.write_tsv([{"hypothesis": "induction heads write more into the output subspace than "
                        "other heads of the same depth bin",
                        "threshold": settings.induction_threshold, "depth_bins": settings.depth_bins,
                        **test}], sm.output.test)
    print(test)


runtime.main(snakemake, body)  # noqa: F821
