"""H0 at one layer: this checkout's run_layer against the implementation of an earlier commit
(default: the baseline before the H0 speed-ups, with the first linear-head shortcut),
alternating in one process, on the embedded default's cache and lens (target: >= 3x faster at
the same grid; the values must agree). This checkout runs twice: with the fused CPU kernel
(``now``, what the jobs run) and without it (``eager``, ``compute.fused_cpu: false``).

    .venv/bin/python benchmarks/h0_speed.py [--layer 15] [--repeats 3] [--before REV]

Needs a finished `results/{run}/lens/params.pt` (e.g.
`snakemake results/smollm2-bible/lens/params.pt`) and git (the earlier implementation is read
with `git show`). Both sides get the same grid (the config's h0 grid) and the same inputs; the
per-sequence KLs of every cell are compared. Both
run with the allocator setting the workflow gives its jobs (huge pages, lensspace.malloc): the
script restarts itself with it when it is not set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from compare_runs import module_at
from snakemake.utils import validate

from lensspace import fused
from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.experiments import h0
from lensspace.lenses import load_lens
from lensspace.malloc import ask_for_huge_pages
from lensspace.models import load_model
from lensspace.settings import ablation_grid
from lensspace.subspaces import load_bases

BEFORE = "a3aa689"  # the baseline: the first linear-head shortcut, before the speed-ups


def main() -> None:
    given = os.environ.get("GLIBC_TUNABLES")
    if ask_for_huge_pages() != given:  # glibc reads it at start: restart as the jobs run
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--run", default="smollm2-bible")
    parser.add_argument("--model", type=Path, default=Path("resources/models/smollm2-135m"))
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--before", default=BEFORE, help="git revision of the implementation to compare with"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = yaml.safe_load(args.config.read_text())
    validate(config, "schemas/config.schema.yaml")
    grid = ablation_grid(config, "h0")
    model, _ = load_model(args.model)
    adapter = Adapter(model)
    run_dir = args.results / args.run
    cache = ActivationCache(run_dir / "activations")
    lens = load_lens(adapter, run_dir / "lens")
    bases = load_bases(str(run_dir / "svd" / "bases.safetensors"))
    before = module_at(args.before, "src/lensspace/experiments/h0.py", "h0_before")

    def with_kernel(flag: bool):
        def run(*run_args):
            fused.enable(flag)
            return h0.run_layer(*run_args)

        return run

    with_kernel(True)(
        adapter, lens, cache, bases, args.layer, grid
    )  # the kernel's one-time loading, untimed
    sides = {"before": before.run_layer, "eager": with_kernel(False), "now": with_kernel(True)}
    times: dict[str, list[float]] = {name: [] for name in sides}
    out = {}
    for _ in range(args.repeats):
        for name, run_layer in sides.items():
            started = time.perf_counter()
            out[name] = run_layer(adapter, lens, cache, bases, args.layer, grid)
            times[name].append(time.perf_counter() - started)
            print(f"{name}: {times[name][-1]:.2f} s", file=sys.stderr)
    n_cells = len(grid.variants(adapter.d_model))
    worst = 0.0
    for cell in out["before"].kl:
        a = torch.cat(out["before"].kl[cell]).mean(-1)
        for side in ("eager", "now"):
            b = torch.cat(out[side].kl[cell]).mean(-1)
            worst = max(worst, float(((a - b).abs() / a.abs().clamp_min(1e-3)).max()))
    t = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"H0 layer {args.layer}, {n_cells} cells, {len(cache.load(args.layer, 'eval'))} sequences: "
        f"before ({args.before}) {t['before']:.2f} s, eager {t['eager']:.2f} s, now {t['now']:.2f} "
        "s "
        f"(medians of {args.repeats}); speed-up {t['before'] / t['now']:.2f}x (target >= 3; eager "
        f"{t['before'] / t['eager']:.2f}x, the fused kernel {t['eager'] / t['now']:.2f}x); largest "
        f"relative difference of a per-sequence KL {worst:.2e}"
    )


if __name__ == "__main__":
    main()
