"""Layer shuffle, alternating in one process on a finished run's model, cache and lens.

1. Lens space: the run that translates only where the order jumps against the one that wraps
   every block (translate in, run, translate out): seconds per order, their ratio, and how far
   apart the two last residuals are (relative norm).
2. A whole job, ``measure`` on the adjacent swaps ``(i, i + 1)`` of ``--job`` in every space:
   this checkout (one native pass per chunk gives every order's start and reference) against
   the ``measure`` of ``--before`` (git revision; one reference pass per order): seconds, ratio
   and the largest KL difference between the two.

    python benchmarks/shuffle_speed.py --run smollm2-bible --pairs 3 12 20 --sequences 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from compare_runs import module_at

from lensspace import runtime
from lensspace.experiments.shuffle import LensSpaceBlocks, measure, swap
from lensspace.lenses import load_lens
from lensspace.runner import BlockRunner


def every_block_wrapped(blocks: LensSpaceBlocks, h: torch.Tensor, perm) -> torch.Tensor:
    """The composition of ``g_b`` as written: every block translated in and out of lens space."""
    first, z = h[:, :1], blocks.to_lens(h[:, 1:], perm.start)
    for b in perm.order:
        out = blocks.runner.call_block(b, torch.cat([first, blocks.from_lens(z, b)], dim=1))
        first, z = out[:, :1], blocks.to_lens(out[:, 1:], b + 1)
    return torch.cat([first, z.float()], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="smollm2-bible")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument(
        "--model", type=Path, default=Path("resources/models/smollm2-135m/lensspace-model.json")
    )
    parser.add_argument("--pairs", type=int, nargs="+", default=[3, 12, 20])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--job",
        type=int,
        nargs="+",
        default=[0, 4, 8, 12],
        help="first blocks of the adjacent swaps measured as one job",
    )
    parser.add_argument(
        "--before", default="e9cc085", help="revision whose measure runs beside this one"
    )
    args = parser.parse_args()
    run = args.results / args.run
    adapter, _ = runtime.open_model(str(args.model), "cpu")
    cache = runtime.open_cache(
        str(run / "activations"), str(run / "data" / "tokens.safetensors"), adapter.device
    )
    runner = BlockRunner(adapter)
    blocks = LensSpaceBlocks(runner, load_lens(adapter, run / "lens"))
    for i in args.pairs:
        perm = swap(adapter.n_layers, i, i + 1)
        h = cache.load(i, "eval")[: args.sequences].float()
        times = {"jumps only": [], "every block": []}
        outputs = {}
        with torch.no_grad():
            for _ in range(args.repeats):
                for name, fn in (
                    ("jumps only", blocks.run),
                    ("every block", lambda x, p: every_block_wrapped(blocks, x, p)),
                ):
                    started = time.perf_counter()
                    outputs[name] = fn(h, perm)
                    times[name].append(time.perf_counter() - started)
        new, old = (statistics.median(times[k]) for k in ("jumps only", "every block"))
        gap = float(
            (outputs["jumps only"] - outputs["every block"]).norm() / outputs["every block"].norm()
        )
        print(
            f"swap ({i}, {i + 1}), {len(perm.order)} blocks: jumps only {new:.2f} s, every block "
            f"{old:.2f} s, ratio {new / old:.2f}; relative gap {gap:.1e}"
        )

    perms = [swap(adapter.n_layers, i, i + 1) for i in args.job]
    ridge = run / "shuffle" / "ridge_lens"
    spaces = {"lens": blocks} | (
        {"lens_ridge": LensSpaceBlocks(runner, load_lens(adapter, ridge))}
        if (ridge / "params.pt").exists()
        else {}
    )
    sides = {
        "this checkout": measure,
        f"before ({args.before})": module_at(
            args.before, "src/lensspace/experiments/shuffle.py", "shuffle_before"
        ).measure,
    }
    times, kls = {name: [] for name in sides}, {}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            started = time.perf_counter()
            rows = fn(runner, cache, perms, spaces, n_boot=10, seed=0, n_sequences=args.sequences)
            times[name].append(time.perf_counter() - started)
            kls[name] = torch.tensor([row["kl"] for row in rows])
    new, old = (statistics.median(times[name]) for name in sides)
    a, b = kls.values()
    print(
        f"measure, swaps at {args.job} in {['native', *spaces]}: this checkout {new:.1f} s, before "
        f"{old:.1f} s, ratio {new / old:.2f}; largest KL difference "
        f"{float((a - b).abs().max()):.1e} "
        f"nats (relative {float(((a - b).abs() / b.abs().clamp(min=1e-12)).max()):.1e})"
    )


if __name__ == "__main__":
    main()
