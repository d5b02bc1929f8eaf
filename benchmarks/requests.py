"""Measured use against requested resources, per rule, from a finished run's benchmark: files.

    .venv/bin/python benchmarks/requests.py [--results results] [--rules rules]

For every rule with benchmark files: the largest max_rss (MB) and wall time (s) over its
jobs, the rule's `mem_mb` and `runtime` (minutes) requests from rules/*.smk, and the
headroom (request / measured). These requests are what SLURM reserves for each job under
`--profile profiles/slurm`; a headroom below 1 means jobs would be killed, a very large one
that the rule holds memory it never uses.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd


def rule_blocks(rules_dir: Path) -> dict[str, str]:
    """Every rule's text in rules/*.smk, by rule name."""
    blocks = {}
    for smk in sorted(rules_dir.glob("*.smk")):
        parts = re.split(r"^rule (\w+):\n", smk.read_text(), flags=re.M)
        blocks.update(zip(parts[1::2], parts[2::2]))
    return blocks


def requests(rules_dir: Path) -> dict[str, dict[str, int]]:
    """{rule: {"mem_mb": ..., "runtime": ...}} from the literal requests in rules/*.smk."""
    return {
        name: {
            key: int(m[1])
            for key in ("mem_mb", "runtime")
            if (m := re.search(rf"^\s+{key}=(\d+),?$", body, re.M))
        }
        for name, body in rule_blocks(rules_dir).items()
    }


def measured(results: Path) -> pd.DataFrame:
    """One row per benchmark file: rule, job (wildcards path), s, max_rss."""
    rows = []
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(results / "benchmarks").parts[0]
        frame = pd.read_csv(tsv, sep="\t")
        rss = pd.to_numeric(frame["max_rss"], errors="coerce").max()
        rows.append(
            {
                "rule": rule,
                "job": str(tsv.relative_to(results / "benchmarks" / rule)),
                "s": float(frame["s"].max()),
                "max_rss": float(rss),
            }
        )
    return pd.DataFrame(rows, columns=["rule", "job", "s", "max_rss"])


def table(results: Path, rules_dir: Path) -> pd.DataFrame:
    jobs = measured(results)
    asked = requests(rules_dir)
    rows = []
    for rule, group in jobs.groupby("rule", sort=True):
        req = asked.get(rule, {})
        mem, minutes = group["max_rss"].max(), group["s"].max() / 60
        rows.append(
            {
                "rule": rule,
                "jobs": len(group),
                "max_rss_mb": round(mem),
                "mem_mb": req.get("mem_mb"),
                "mem_headroom": round(req["mem_mb"] / mem, 1)
                if req.get("mem_mb") and mem
                else None,
                "max_min": round(minutes, 2),
                "runtime_min": req.get("runtime"),
                "time_headroom": round(req["runtime"] / minutes, 1)
                if req.get("runtime") and minutes
                else None,
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--rules", type=Path, default=Path(__file__).resolve().parents[1] / "rules")
    args = parser.parse_args()
    frame = table(args.results, args.rules)
    if frame.empty:
        raise SystemExit(
            f"no benchmark files under {args.results}/benchmarks: run the workflow first"
        )
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
