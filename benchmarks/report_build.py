"""Time the report build from finished results (target: under 30 s), as the rule runs it:
import the library, read every run's results, write the page.

    .venv/bin/python benchmarks/report_build.py [--results results] [--configfile config.yaml]

The page goes to a temporary file (--out to keep it); results/report/index.html is not touched.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

TARGET_S = 30.0
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--resources", type=Path, default=Path("resources"))
    parser.add_argument("--configfile", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = yaml.safe_load(args.configfile.read_text())
    missing = [run for run in config["runs"] if not (args.results / run / "lens_eval.tsv").exists()]
    if missing:
        raise SystemExit(
            f"no finished results for run(s) {', '.join(missing)} under {args.results}: "
            "run the workflow first"
        )
    start = time.perf_counter()
    from lensspace import runtime
    from lensspace.report import build

    imported = time.perf_counter()
    page = build(
        config,
        results=args.results,
        reference=ROOT / "reference" / "seed_tables.tsv",
        resources=args.resources,
        workflow_dir=ROOT,
    )
    built = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp()) / "index.html"
    runtime.write_text(page, out)
    done = time.perf_counter()
    print(f"runs: {', '.join(config['runs'])}; page {out.stat().st_size / 1e6:.1f} MB at {out}")
    print(
        f"import {imported - start:.2f} s, build {built - imported:.2f} s, write "
        f"{done - built:.2f} s"
    )
    print(
        f"report build: {done - start:.2f} s; / target ({TARGET_S:.0f} s): "
        f"{(done - start) / TARGET_S:.2f}"
    )


if __name__ == "__main__":
    main()
