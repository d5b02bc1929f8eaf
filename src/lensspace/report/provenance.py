"""The page's provenance: config hash, git state, machine, per-rule time and memory, and the
installed package versions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from lensspace import provenance
from lensspace.report.blocks import Section, Table, Text
from lensspace.report.render import esc


def section(config: dict, results: Path, workflow_dir: Path) -> Section:
    names = set(config["runs"]) | {spec["model"] for spec in config["runs"].values()}
    jobs = provenance.benchmark_jobs(results, names)
    rules = provenance.per_rule(jobs).rename(
        columns={"total_s": "total s", "max_s": "max s", "peak_rss_mb": "peak RSS MB"}
    )
    git = provenance.git_state(workflow_dir)
    facts = pd.DataFrame(
        [
            ("config sha256", provenance.config_hash(config)),
            ("git commit", git["commit"]),
            ("uncommitted changes", git["dirty"]),
            *provenance.machine().items(),
            *provenance.compute_records(results, config["runs"]).items(),
        ],
        columns=["what", "value"],
    )
    versions = pd.DataFrame(
        sorted(provenance.package_versions().items()), columns=["package", "version"]
    )
    total = (
        f"{len(jobs)} benchmarked jobs, {jobs['s'].sum():.1f} s in all; the largest peak RSS "
        f"{jobs['max_rss_mb'].max():.0f} MB."
        if not jobs.empty
        else "No benchmark files found."
    )
    return Section(
        "provenance",
        "Provenance",
        [
            Table(
                facts,
                "The config's hash is the sha256 of the config as canonical JSON.",
                with_markdown=False,
            ),
            Text(
                "<details><summary>Config</summary><pre>"
                f"{esc(yaml.safe_dump(config, sort_keys=False))}</pre></details>",
                html=True,
            ),
            Table(
                rules,
                "Per-rule time and memory from the rules' benchmark: files "
                f"(results/benchmarks/): wall seconds summed over jobs, the longest job, and the "
                f"peak resident memory of any job. {total}",
                digits=1,
            ),
            Table(
                versions,
                "Installed package versions (the project's pinned dependencies).",
                with_markdown=False,
            ),
        ],
    )
