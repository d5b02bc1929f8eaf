"""Where a result came from: the config and its hash, package versions, the git commit, the
machine, and each job's time and memory as Snakemake's ``benchmark:`` files recorded them."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import pandas as pd

BENCHMARK_COLUMNS = ["rule", "job", "s", "max_rss_mb"]


def benchmark_jobs(results: str | Path, names: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per job from ``results/benchmarks/{rule}/**.tsv``: rule, job, s, max_rss_mb.

    A benchmark file's path after the rule names its wildcards (``h0_layer/{run}/{layer}.tsv``,
    ``prepare_model/{model}.tsv``). With ``names`` (runs, models, ...), only the jobs whose path
    has one of them as a component are kept: a shared results folder holds other studies too.
    """
    root = Path(results) / "benchmarks"
    wanted = set(names) if names is not None else None
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        parts = path.relative_to(root).with_suffix("").parts
        if wanted is not None and not wanted.intersection(parts[1:]):
            continue
        bench = pd.read_csv(path, sep="\t")
        if bench.empty:
            continue
        rows.append(
            {
                "rule": parts[0],
                "job": "/".join(parts[1:]),
                "s": float(bench["s"].iloc[-1]),
                "max_rss_mb": float(bench["max_rss"].iloc[-1]),
            }
        )
    return pd.DataFrame(rows, columns=BENCHMARK_COLUMNS)


def logged_startups(results: str | Path) -> pd.DataFrame:
    """One row per job whose log (``results/logs/{rule}/**.log``) records its start-up: rule, job,
    ``startup_s`` (process start to model loaded, as ``runtime.open_model`` logs it) and
    ``kernels_s`` (the fused kernels' first calls, as ``fused`` logs them; 0 where none ran)."""
    from lensspace.fused import FIRST_CALL_LINE
    from lensspace.runtime import STARTUP_LINE

    root = Path(results) / "logs"
    rows = []
    for path in sorted(root.rglob("*.log")):
        startup, kernels = None, 0.0
        for line in path.read_text(errors="replace").splitlines():
            # a progress bar's line has no end of its own: a record may follow it on the same line
            at_startup, at_kernel = line.find(STARTUP_LINE), line.find(FIRST_CALL_LINE)
            try:
                if at_startup >= 0:
                    startup = float(line[at_startup + len(STARTUP_LINE) :].split()[0])
                elif at_kernel >= 0:
                    kernels += float(line[at_kernel + len(FIRST_CALL_LINE) :].split()[1])
            except (
                IndexError,
                ValueError,
            ):  # a line cut short (a job killed mid-write): not a record
                continue
        if startup is not None:
            parts = path.relative_to(root).with_suffix("").parts
            rows.append(
                {
                    "rule": parts[0],
                    "job": "/".join(parts[1:]),
                    "startup_s": startup,
                    "kernels_s": kernels,
                }
            )
    return pd.DataFrame(rows, columns=["rule", "job", "startup_s", "kernels_s"])


def per_rule(jobs: pd.DataFrame) -> pd.DataFrame:
    """rule | jobs | total_s | max_s | peak_rss_mb, the most expensive rule first."""
    if jobs.empty:
        return pd.DataFrame(columns=["rule", "jobs", "total_s", "max_s", "peak_rss_mb"])
    table = jobs.groupby("rule").agg(
        jobs=("s", "size"),
        total_s=("s", "sum"),
        max_s=("s", "max"),
        peak_rss_mb=("max_rss_mb", "max"),
    )
    return table.sort_values("total_s", ascending=False).reset_index()


def compute_records(results: str | Path, runs: Iterable[str]) -> dict[str, str]:
    """Per run, where its activation cache was computed (device, GPU, TF32), as its
    ``meta.json`` recorded it; runs whose cache has no record are left out."""
    records = {}
    for run in runs:
        meta_path = Path(results) / run / "activations" / "meta.json"
        record = json.loads(meta_path.read_text()).get("compute") if meta_path.exists() else None
        if record:
            where = record["device"] + (
                f" ({record['gpu']}, CUDA {record.get('cuda')})" if "gpu" in record else ""
            )
            records[f"compute ({run})"] = (
                f"{where}; TF32 {'on' if record['allow_tf32'] else 'off'}, "
                f"fp32 matmul precision {record['float32_matmul_precision']}"
                + (
                    f", CPU products by {record['cpu_products']}"
                    if "cpu_products" in record
                    else ""
                )
            )
    return records


def config_hash(config: dict) -> str:
    """sha256 of the config as canonical JSON (sorted keys): equal configs, equal hashes."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def package_versions(distribution: str = "lensspace") -> dict[str, str]:
    """Python and the installed version of ``distribution`` and of each of its requirements."""
    versions = {"python": platform.python_version(), distribution: _version(distribution)}
    for requirement in metadata.requires(distribution) or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]
        versions[name] = _version(name)
    return versions


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_state(folder: str | Path) -> dict[str, str]:
    """The commit checked out in ``folder`` and whether tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (not a git checkout)", "dirty": "unknown"}
    return {
        "commit": commit,
        "dirty": "yes: tracked files differ from the commit" if dirty else "no",
    }


def machine() -> dict[str, str]:
    """Host name, OS, CPU, core count, memory and accelerator (if torch sees one)."""
    info = {
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": _memory(),
        "python": sys.version.split()[0],
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"
