"""Layer shuffle: a batch of swap pairs (params.pairs), or else the window permutations and
the translators' condition numbers, natively and in each lens space of the config."""

from pathlib import Path

from lensspace import runtime
from lensspace.experiments.shuffle import LensSpaceBlocks, measure, swap, window_permutations
from lensspace.lenses import load_lens
from lensspace.runner import BlockRunner


def body(sm):
    adapter, _ = runtime.open_model(sm.input.model, sm.params.device, sm.params.compute)
    cache = runtime.open_cache(sm.input.cache, sm.input.tokens, adapter.device)
    settings = sm.params.shuffle
    runner = BlockRunner(adapter)
    lenses = {}
    if "lens" in settings["spaces"] or not sm.params.pairs:  # lens space, or its condition numbers
        lenses["lens"] = LensSpaceBlocks(
            runner, load_lens(adapter, Path(sm.input.lens).parent), sm.params.lens_ridge
        )
    if sm.params.second_ridge is not None:
        lenses["lens_ridge"] = LensSpaceBlocks(
            runner, load_lens(adapter, Path(sm.input.ridge_lens).parent), sm.params.second_ridge
        )
    if sm.params.pairs:
        perms, kind = [swap(adapter.n_layers, i, j) for i, j in sm.params.pairs], "swap"
    else:
        perms, kind = (
            window_permutations(
                adapter.n_layers, settings["window"], settings["window_samples"], sm.params.seed
            ),
            "window",
        )
        runtime.write_tsv(
            [
                {"layer": i, "condition_number": c, "lens": name, "ridge": blocks.ridge}
                for name, blocks in lenses.items()
                for i, c in enumerate(blocks.conditions)
            ],
            sm.output.conditions,
        )
    spaces = {name: blocks for name, blocks in lenses.items() if name in settings["spaces"]}
    rows = measure(
        runner,
        cache,
        perms,
        spaces,
        n_boot=sm.params.n_boot,
        seed=sm.params.seed,
        n_sequences=settings.get("eval_sequences"),
        chunk=runtime.compute_settings(sm.params.compute).chunk(adapter.device),
    )
    runtime.write_tsv([{**row, "kind": kind} for row in rows], sm.output.table)


runtime.main(snakemake, body)  # noqa: F821
