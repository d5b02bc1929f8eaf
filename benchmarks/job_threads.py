"""Two heavy jobs on the 2-core laptop, side by side: one after the other at two threads each (what
the default profile does today: every heavy rule has ``threads: 2``) against both at once at one
thread each, alternating, several rounds.

    .venv/bin/python benchmarks/job_threads.py [--model resources/models/smollm2-135m] [--rounds 3]

A job is H1's work at one layer, as its own process: import, load the model, a clean reference
(two full passes), then ``--cells`` passes of blocks ``--start..L-1``, the head and the KL on
``--sequences`` sequences. Prints per round the wall time of each layout and, of the work alone
(start-up excluded), the summed seconds; then the medians' ratios (parallel / serial: below 1
means two single-thread jobs at once finish sooner).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One job: prints ``startup_s work_s``."""
    import torch

    torch.set_num_threads(args.child)
    started = time.perf_counter()
    from lensspace.adapter import Adapter
    from lensspace.divergences import KLReference
    from lensspace.models import load_model
    from lensspace.runner import BlockRunner

    model, tokenizer = load_model(args.model)
    adapter = Adapter(model)
    runner = BlockRunner(adapter)
    ids = torch.randint(
        0, len(tokenizer), (args.sequences, 128), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        h = adapter.embed_tokens(ids)
        reference = KLReference.from_logits(adapter.logits(runner.run(h, 0)[:, 1:]))
        reference.kl(adapter.logits(runner.run(h, 0)[:, 1:]))  # the KL's kernel loaded and warm
        start = runner.run(h, 0, order=range(args.start))
        ready = time.perf_counter()
        for cell in range(args.cells):
            reference.kl(
                adapter.logits(runner.run(start * (1 + 1e-3 * (cell + 1)), args.start)[:, 1:])
            )
    print(f"{ready - started:.3f} {time.perf_counter() - ready:.3f}")


def jobs(args: argparse.Namespace, threads: int, together: bool) -> tuple[float, float]:
    """Two jobs, one after the other or at once: (wall seconds, summed work seconds)."""
    command = [
        sys.executable,
        __file__,
        "--child",
        str(threads),
        "--model",
        str(args.model),
        "--sequences",
        str(args.sequences),
        "--start",
        str(args.start),
        "--cells",
        str(args.cells),
    ]
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}  # as the workflow's jobs run
    started = time.perf_counter()
    if together:
        running = [
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
            )
            for _ in range(2)
        ]
        outputs = [p.communicate()[0] for p in running]
    else:
        outputs = [
            subprocess.run(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
                check=True,
            ).stdout
            for _ in range(2)
        ]
    wall = time.perf_counter() - started
    work = sum(float(out.split()[-1]) for out in outputs)
    return wall, work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("resources/models/smollm2-135m"))
    parser.add_argument(
        "--sequences", type=int, default=4, help="one CPU chunk (compute.chunk_sequences)"
    )
    parser.add_argument("--start", type=int, default=10, help="the layer the cells start from")
    parser.add_argument(
        "--cells", type=int, default=12, help="H1's cells per layer in the default grid"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not (args.model / "config.json").is_file():
        sys.exit(
            f"{args.model}: no prepared model (run the README's main command first, or pass "
            "--model)"
        )
    rows = {"serial, 2 threads": [], "parallel, 1 thread": []}
    for round_ in range(args.rounds):
        for label, threads, together in (
            ("serial, 2 threads", 2, False),
            ("parallel, 1 thread", 1, True),
        ):
            wall, work = jobs(args, threads, together)
            rows[label].append((wall, work))
            print(
                f"round {round_ + 1}, {label}: wall {wall:.1f} s, work {work:.1f} s summed over "
                "the 2 jobs",
                flush=True,
            )
    (serial_wall, serial_work), (par_wall, par_work) = (
        (statistics.median(w for w, _ in v), statistics.median(x for _, x in v))
        for v in rows.values()
    )
    print(
        f"medians: serial wall {serial_wall:.1f} s, parallel wall {par_wall:.1f} s: ratio "
        f"{par_wall / serial_wall:.2f}"
    )
    # the parallel jobs' work overlaps (each about half the sum): its span is half the summed
    # seconds
    print(
        f"work alone: {par_work / 2:.1f} s at once against {serial_work:.1f} s one after the "
        "other: "
        f"ratio {par_work / 2 / serial_work:.2f}"
    )


if __name__ == "__main__":
    main()
