"""The circuit search's cost, side by side in one process: EAP-IG over the whole graph of the
default model against the same search restricted to a fraction of the nodes (held MLPs compute
nothing; every head still runs), alternating, on one task's prompts.

    .venv/bin/python benchmarks/circuit_search.py [--task ioi] [--fractions 0.1 0.3] [--repeats 2]

Prints per search its counted FLOPs and measured seconds (the best of ``--repeats``) and both as
ratios to the full search's. The FLOP ratio is what the study reports as compute; the wall-time
ratio shows how much of it this runner turns into time (target: none, it is a measurement).
Needs the default model prepared (``resources/models/smollm2-135m``, the README's first command).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lensspace import runtime
from lensspace.experiments.circuit_search import (
    FlopCounter,
    GraphRunner,
    eap_ig,
    prompts_of,
    random_nodes,
)
from lensspace.experiments.circuit_tasks import TaskSettings, make_task

MANIFEST = Path("resources/models/smollm2-135m/lensspace-model.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    adapter, tokenizer = runtime.open_model(MANIFEST, "cpu")
    runner = GraphRunner(adapter)
    task = make_task(args.task, tokenizer, adapter.unembedding.shape[0], TaskSettings())
    prompts = prompts_of(runner, task.clean, task.corrupt, task.metric)
    counter = FlopCounter(adapter, prompts.clean.shape[1], prompts.clean.shape[0])
    with torch.no_grad():
        corrupt_run = runner.run(prompts.corrupt)
    searches = {"full": None}
    for fraction in args.fractions:
        searches[f"{fraction:.0%} of the nodes"] = random_nodes(
            runner.graph.n_upstream, fraction, seed=0
        )
    best: dict[str, float] = {}
    flops: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, kept in searches.items():
            start = time.perf_counter()
            scores = eap_ig(runner, prompts, args.steps, counter, kept, corrupt_run)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
            flops[name] = scores.cost.flops
    print(f"{'search':<22}{'GFLOP':>10}{'seconds':>10}{'FLOP ratio':>12}{'wall ratio':>12}")
    for name in searches:
        print(
            f"{name:<22}{flops[name] / 1e9:>10.1f}{best[name]:>10.2f}"
            f"{flops[name] / flops['full']:>12.3f}{best[name] / best['full']:>12.3f}"
        )


if __name__ == "__main__":
    main()
