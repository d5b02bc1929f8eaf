"""The halving target, side by side in one run: the embedded default at the smaller sample it had
at the baseline commit (``--before``), run once with that commit's code and once with this
working tree's, each from scratch in its own folder, on this machine.

    .venv/bin/python benchmarks/half_cost.py [--before REV] [--keep /tmp/half_cost]

The earlier code runs its own default config. This tree runs its default config with every
section the earlier config has put back to the earlier values (layers, random draws, shuffle
pairs, sequences, lens training; no evaluation corpora), so both do the same experiments at the
same sample. The targets are the earlier default's outputs (lens evaluation, spectra, H0, H1 and
its heads, H2, shuffle, their tables and figures) without the report, whose inputs differ. Prints
both wall times (start-up included), the sum of each run's benchmarked rule times, their ratio
(target: after / before <= 0.5) and the largest per-sequence H0 KL difference between the two.

With ``--one-thread`` it runs this tree twice instead, at the same sample: with the rules' own
``threads:`` (one two-thread job at a time on 2 cores) and with every multi-thread rule set to one
thread (``--set-threads``: two jobs at once), and prints the ratio of the second to the first.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from compare_runs import ROOT, export_ref, work_folder
from requests import rule_blocks

from lensspace.provenance import benchmark_jobs

BEFORE = "a3aa689"  # the baseline: the default before the speed-ups, at its smaller sample
TARGETS = [
    "{run}/lens_eval.tsv",
    "{run}/svd/spectrum.tsv",
    "{run}/h0/ablation.tsv",
    "tables/h0_{run}.md",
    "figures/h0_{run}.png",
    "figures/lens_{run}.png",
    "{run}/h1/ablation.tsv",
    "tables/h1_{run}.md",
    "figures/h1_{run}.png",
    "{run}/h1/heads.tsv",
    "figures/h1_heads_{run}.png",
    "{run}/h2/ablation.tsv",
    "tables/h2_{run}.md",
    "figures/h2_{run}.png",
    "{run}/shuffle/swaps.tsv",
    "figures/shuffle_{run}.png",
]


def at_earlier_sample(now: dict, earlier: dict) -> dict:
    """This tree's config with every top-level section of the earlier config put back."""
    return {**now, **earlier}


def threaded_rules(tree: Path) -> list[str]:
    """The rules of ``tree`` that declare more than one thread."""
    return [
        name
        for name, body in rule_blocks(tree / "rules").items()
        if (m := re.search(r"^\s+threads: (\d+)$", body, re.M)) and int(m[1]) > 1
    ]


def run(
    tree: Path, config: dict, workdir: Path, cores: int, extra: list[str] | None = None
) -> tuple[float, float]:
    """The workflow of ``tree`` with ``config`` in ``workdir``: (wall s, sum of rule seconds)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    targets = [f"results/{t.format(run=name)}" for name in config["runs"] for t in TARGETS]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}  # the tree's own package first
    log = workdir / "snakemake.log"
    print(f"{tree}: running in {workdir} (log {log})", flush=True)
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-s",
                str(tree / "Snakefile"),
                "--directory",
                str(workdir),
                "--configfile",
                str(workdir / "study.yaml"),
                "--cores",
                str(cores),
                *targets,
                *(extra or []),
            ],  # extra last: --set-threads takes a list
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"the run in {workdir} failed: see {log}")
    return wall, float(benchmark_jobs(workdir / "results")["s"].sum())


def h0_gap(a: Path, b: Path) -> tuple[float, float]:
    """Largest absolute (nats) and relative difference of the deterministic H0 cells' per-sequence
    KLs
    (random cells aside: the two versions draw their subspaces differently)."""
    keys = ["layer", "subspace", "k", "basis", "mode", "site", "sequence"]
    frames = [pd.read_csv(p, sep="\t") for p in (a, b)]
    frames = [f[f["subspace"] != "random"].set_index(keys)["kl"] for f in frames]
    joined = pd.concat(frames, axis=1, join="inner", keys=["a", "b"])
    if joined.empty:
        return float("nan"), float("nan")
    gap = (joined["a"] - joined["b"]).abs()
    return float(gap.max()), float((gap / joined["a"].abs().clip(lower=1e-12)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--before", default=BEFORE, help="git revision of the earlier code and sample"
    )
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument(
        "--keep", type=Path, help="run in this folder and keep it (default: a temporary one)"
    )
    parser.add_argument(
        "--one-thread",
        action="store_true",
        help="this tree twice: the rules' threads against one thread per job (two jobs at once)",
    )
    args = parser.parse_args()
    with work_folder(args.keep) as base:
        earlier_tree = export_ref(args.before, base)
        earlier = yaml.safe_load((earlier_tree / "config.yaml").read_text())
        now = at_earlier_sample(yaml.safe_load((ROOT / "config.yaml").read_text()), earlier)
        if args.one_thread:
            compare_threads(now, base, args.cores)
            return
        sides = {
            f"before ({args.before})": (earlier_tree, earlier, base / "before"),
            "this tree": (ROOT, now, base / "after"),
        }
        times = {
            name: run(tree, config, workdir, args.cores)
            for name, (tree, config, workdir) in sides.items()
        }
        for name, (wall, rules) in times.items():
            print(f"{name}: {wall:.0f} s wall, {rules:.0f} s in benchmarked rules")
        (before_wall, before_rules), (after_wall, after_rules) = times.values()
        print(
            f"after / before: wall {after_wall / before_wall:.2f}, rule time "
            f"{after_rules / before_rules:.2f} "
            "(target: wall <= 0.50)"
        )
        run_name = next(iter(earlier["runs"]))
        per_sequence = [
            workdir / "results" / run_name / "h0" / "per_sequence.tsv"
            for *_, workdir in sides.values()
        ]
        if all(p.exists() for p in per_sequence):
            gap, relative = h0_gap(*per_sequence)
            print(
                "H0 per-sequence KL, output / internal cells: largest |before - after| = "
                f"{gap:.2e} nats, "
                f"largest relative {relative:.1e}"
            )


def compare_threads(config: dict, base: Path, cores: int) -> None:
    """This tree at ``config``: the rules' own threads, then every multi-thread rule at one."""
    single = ["--set-threads", *(f"{rule}=1" for rule in threaded_rules(ROOT))]
    (own_wall, own_rules), (one_wall, one_rules) = (
        run(ROOT, config, base / "own_threads", cores),
        run(ROOT, config, base / "one_thread", cores, single),
    )
    print(f"rules' threads: {own_wall:.0f} s wall, {own_rules:.0f} s in benchmarked rules")
    print(f"one thread per job: {one_wall:.0f} s wall, {one_rules:.0f} s in benchmarked rules")
    print(f"one thread / rules' threads: wall {one_wall / own_wall:.2f}")


if __name__ == "__main__":
    main()
