"""The C library's allocator settings side by side: glibc's default, huge pages (what the
workflow's jobs use, malloc.huge_page_tunables) and freed memory kept for reuse
(malloc.keep_freed_memory): seconds, peak RSS and page faults of the lens evaluation and of one
H1 layer, each in a fresh process.

    .venv/bin/python benchmarks/freed_memory.py [--results results] [--h1-layer 15] [--repeats 2]

Needs a finished run of the embedded default (its cache, lens and bases). Each work item runs in
its own child process per setting, alternating, so none inherits another's heap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from lensspace.malloc import huge_page_tunables

CHILD = r"""
import json, resource, sys, time
import torch, yaml
from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.lenses import evaluate_lens, load_lens
from lensspace.models import load_model
from lensspace.runner import BlockRunner
from lensspace.malloc import keep_freed_memory
from lensspace.settings import ablation_grid
from lensspace.subspaces import load_bases
from lensspace.experiments import h1

work, keep, run_dir = sys.argv[1], sys.argv[2] == "keep", sys.argv[3]
model_dir, layer = sys.argv[4], int(sys.argv[5])
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
    bases = load_bases(f"{run_dir}/svd/bases.safetensors")
    h1.run_layers(BlockRunner(adapter), lens, cache, bases, [layer], grid)
seconds = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
peak_mb, faults_m = usage.ru_maxrss / 1024, usage.ru_minflt / 1e6
print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "faults_m": faults_m}))
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
    plain = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    settings = {
        "default": plain,
        "huge_pages": {**plain, "GLIBC_TUNABLES": huge_page_tunables(None)},
        "keep": plain,
    }
    for work in ("eval_lens", "h1_layer"):
        got: dict[str, list[dict]] = {name: [] for name in settings}
        for _ in range(args.repeats):
            for name, env in settings.items():
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        work,
                        name,
                        str(run_dir),
                        str(args.model),
                        str(args.h1_layer),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                )
                got[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{work} {name}: {got[name][-1]}", file=sys.stderr)
        med = {
            name: {
                key: statistics.median(r[key] for r in rows)
                for key in ("seconds", "peak_mb", "faults_m")
            }
            for name, rows in got.items()
        }
        base = med["default"]
        print(
            f"{work}: "
            + "; ".join(
                f"{name} {m['seconds']:.1f} s ({base['seconds'] / m['seconds']:.2f}x default's "
                "speed), "
                f"{m['peak_mb']:.0f} MB, {m['faults_m']:.2f}M page faults"
                for name, m in med.items()
            )
        )


if __name__ == "__main__":
    main()
