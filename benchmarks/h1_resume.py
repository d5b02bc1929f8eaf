"""H1 sweep resumed from cached residuals vs the same sweep as full forwards with a hook,
measured side by side on the embedded default's model (target: >= 1.6x faster).

    .venv/bin/python benchmarks/h1_resume.py [--model resources/models/smollm2-135m]

Both compute identical logits (checked); the resumed sweep skips blocks 0..i-1 at layer i.
The sweep is the config's: its h1 layers and as many ablations per layer as its grid has
(the clean reference pass that h1_layer adds per layer is left out of both sides).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from snakemake.utils import validate

from lensspace.activations import residuals
from lensspace.adapter import Adapter
from lensspace.models import load_model
from lensspace.runner import BlockRunner, hooked
from lensspace.settings import ablation_grid, experiment_layers
from lensspace.subspaces import ablate, random_subspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("resources/models/smollm2-135m"))
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("config.yaml"),
        help="the study whose h1 layers and grid size are swept (default: the embedded default)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model)
    adapter = Adapter(model)
    runner = BlockRunner(adapter)
    ids = torch.randint(
        0,
        len(tokenizer),
        (args.sequences, args.seq_len),
        generator=torch.Generator().manual_seed(0),
    )
    config = yaml.safe_load(args.config.read_text())
    validate(config, "schemas/config.schema.yaml")
    layers = experiment_layers(config, adapter.n_layers, "h1")
    n_cells = len(ablation_grid(config, "h1").variants(adapter.d_model))
    cache = residuals(adapter, ids)  # what the activation cache holds
    qs = [random_subspace(adapter.d_model, adapter.d_model // 2, seed) for seed in range(n_cells)]

    def resumed() -> list[torch.Tensor]:
        return [
            runner.logits(
                cache[layer], layer, interventions={layer: lambda h, q=q: ablate(h, q, "zero")}
            )
            for layer in layers
            for q in qs
        ]

    def full() -> list[torch.Tensor]:
        out = []
        with torch.no_grad():
            for layer in layers:
                for q in qs:
                    with hooked(adapter, layer, lambda h, q=q: ablate(h, q, "zero")):
                        out.append(adapter.model(ids, use_cache=False).logits)
        return out

    runner.block_context(*ids.shape)  # warm-up, excluded from both
    timings = {}
    for name, sweep in (("full forward + hook", full), ("resumed from cache", resumed)) * 2:
        start = time.perf_counter()
        result = sweep()
        timings.setdefault(name, []).append(time.perf_counter() - start)
        if name == "full forward + hook":
            reference = result
        else:
            worst = max(float((a - b).abs().max()) for a, b in zip(reference, result))
            assert worst < 1e-3, f"resumed and full sweeps differ by {worst}"
    best = {name: min(ts) for name, ts in timings.items()}
    for name, seconds in best.items():
        print(f"{name:>20}: {seconds:6.1f} s for layers {layers} x {n_cells} ablations")
    print(
        f"speed-up resumed / full: {best['full forward + hook'] / best['resumed from cache']:.2f}x "
        "(target >= 1.6x)"
    )


if __name__ == "__main__":
    main()
