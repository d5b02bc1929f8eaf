"""The C library's memory setting (runtime.keep_freed_memory) against glibc's default, side by
side: seconds and peak RSS of the lens evaluation and of one H1 layer, each in a fresh process.

    .venv/bin/python benchmarks/freed_memory.py [--results results] [--h1-layer 15] [--repeats 2]

Needs a finished run of the embedded default (its cache, lens and bases). Each work item runs in
its own child process per setting, alternating, so neither inherits the other's heap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch, yaml
from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.lenses import evaluate_lens, load_lens
from lensspace.models import load_model
from lensspace.runner import BlockRunner
from lensspace.runtime import keep_freed_memory
from lensspace.settings import ablation_grid
from lensspace.subspaces import load_bases
from lensspace.experiments import h1

work, keep, run_dir, model_dir, layer = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4], int(sys.argv[5])
torch.set_num_threads(2)
keep_freed_memory(keep)
model, _ = load_model(model_dir)
adapter = Adapter(model)
cache = ActivationCache(f"{run_dir}/activations")
lens = load_lens(adapter, f"{run_dir}/lens")
started = time.perf_counter()
if work == "eval_lens":
    evaluate_lens(adapter, lens, cache, 200, 0)
else:
    grid = ablation_grid(yaml.safe_load(open("config.yaml")), "h1")
    h1.run_layer(BlockRunner(adapter), lens, cache, load_bases(f"{run_dir}/svd/bases.safetensors"), layer, grid)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--run", default="smollm2-bible")
    parser.add_argument("--model", type=Path, default=Path("resources/models/smollm2-135m"))
    parser.add_argument("--h1-layer", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    run_dir = args.results / args.run
    for work in ("eval_lens", "h1_layer"):
        got: dict[bool, list[dict]] = {True: [], False: []}
        for _ in range(args.repeats):
            for keep in (True, False):
                out = subprocess.run([sys.executable, "-c", CHILD, work, str(int(keep)), str(run_dir), str(args.model),
                                      str(args.h1_layer)], capture_output=True, text=True, check=True)
                got[keep].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{work} keep={keep}: {got[keep][-1]}", file=sys.stderr)
        med = {keep: {key: statistics.median(r[key] for r in rows) for key in ("seconds", "peak_mb")}
               for keep, rows in got.items()}
        print(f"{work}: kept freed memory {med[True]['seconds']:.1f} s, {med[True]['peak_mb']:.0f} MB; glibc default "
              f"{med[False]['seconds']:.1f} s, {med[False]['peak_mb']:.0f} MB; time ratio (default / kept) "
              f"{med[False]['seconds'] / med[True]['seconds']:.2f}, peak ratio {med[True]['peak_mb'] / med[False]['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
