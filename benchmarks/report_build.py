"""Time the report build from finished results (target: under 30 s), as the rule runs it:
import the library, read every registered experiment's results, write the page.

    .venv/bin/python benchmarks/report_build.py [--directory .] [--configfile config.yaml]
        [--experiments experiments.json] [--out page.html]

The experiments (name, section module, files per run) come from the workflow's registry, as
rule html_report gets them: the Snakefile is parsed with the config (no job runs), or they are
read from --experiments, a JSON file of that list. Paths in it are relative to --directory, the
workflow's working directory. The page goes to a temporary file (--out to keep it);
results/report/index.html is not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

TARGET_S = 30.0
ROOT = Path(__file__).resolve().parents[1]


def registered(configfile: Path, directory: Path) -> tuple[dict, list[dict]]:
    """The validated config and the report's experiment list, as the workflow builds them
    (rules/common.smk)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        OutputSettings,
        ResourceSettings,
        StorageSettings,
    )

    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[configfile.resolve()]),
            storage_settings=StorageSettings(),
            snakefile=ROOT / "Snakefile",
            workdir=directory.resolve(),
        )
        parsed = workflow._workflow
        return dict(parsed.config), parsed.globals["get_report_experiments"]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", type=Path, default=Path("."))
    parser.add_argument("--configfile", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--experiments", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp()) / "index.html").resolve()
    if args.experiments is not None:
        config = yaml.safe_load(args.configfile.read_text())
        experiments = json.loads(args.experiments.read_text())
    else:
        config, experiments = registered(args.configfile, args.directory)
    os.chdir(args.directory)
    lens = next((e for e in experiments if e["name"] == "lens"), {"files": {}})
    missing = [
        run
        for run in config["runs"]
        if not Path(lens["files"].get(run, {}).get("lens_eval", "-")).exists()
    ]
    if missing:
        raise SystemExit(
            f"no finished results for run(s) {', '.join(missing)} under {Path.cwd()}: "
            "run the workflow first"
        )
    start = time.perf_counter()
    from lensspace import runtime
    from lensspace.report import build

    imported = time.perf_counter()
    page = build(
        config,
        experiments,
        results=Path("results"),
        reference=ROOT / "reference" / "seed_tables.tsv",
        workflow_dir=ROOT,
    )
    built = time.perf_counter()
    runtime.write_text(page, out)
    done = time.perf_counter()
    print(f"runs: {', '.join(config['runs'])}; page {out.stat().st_size / 1e6:.1f} MB at {out}")
    print(
        f"import {imported - start:.2f} s, build {built - imported:.2f} s, "
        f"write {done - built:.2f} s"
    )
    print(
        f"report build: {done - start:.2f} s; / target ({TARGET_S:.0f} s): "
        f"{(done - start) / TARGET_S:.2f}"
    )


if __name__ == "__main__":
    main()
