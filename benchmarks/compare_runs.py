"""The tiny study run twice, its TSVs compared: two versions of the code, or two devices.

    .venv/bin/python benchmarks/compare_runs.py --ref main            # CPU: byte-identical?
    .venv/bin/python benchmarks/compare_runs.py --devices cpu cuda    # GPU vs CPU: within 1e-4?

``--ref REF``: the tiny config (configs/tiny.yaml) run with the code of git ref REF (exported
with ``git archive``) and with this working tree, both on the CPU; every TSV under results/
(logs and benchmarks aside) must be byte-identical. ``--devices A B``: this tree's code run
with ``device: A`` and ``device: B``; every numeric cell must agree within ``--rtol``
(relative to the larger magnitude, with ``--atol`` for values near zero), every other cell
exactly. Prints one line per differing file and a summary; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def module_at(revision: str, path: str, name: str):
    """The Python file ``path`` as it was at git ``revision``, imported as module ``name``."""
    text = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(text)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def export_ref(ref: str, into: Path) -> Path:
    """The tracked files of ``ref`` in a fresh folder."""
    archive = into / "ref.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), ref], check=True
    )
    tree = into / "ref"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


@contextmanager
def work_folder(keep: Path | None):
    """``keep`` (created, kept afterwards), or a temporary folder removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        base = keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        yield base


def run_tiny(tree: Path, workdir: Path, device: str, cores: int) -> float:
    """The tiny config with ``tree``'s code and ``device``; returns the wall time in seconds."""
    config = yaml.safe_load((tree / "configs" / "tiny.yaml").read_text())
    config["corpora"]["tiny-text"]["path"] = str(tree / "tests" / "data" / "tiny_corpus.txt")
    config["device"] = device
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "study.yaml").write_text(yaml.safe_dump(config))
    # PYTHONPATH puts the tree's own package ahead of any installed lensspace
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    started = time.perf_counter()
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
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        sys.exit(f"tiny run in {workdir} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def tables(workdir: Path) -> dict[str, Path]:
    results = workdir / "results"
    return {
        str(p.relative_to(results)): p
        for p in sorted(results.rglob("*.tsv"))
        if p.relative_to(results).parts[0] not in ("logs", "benchmarks")
    }


def numeric_difference(a: Path, b: Path, rtol: float, atol: float) -> str | None:
    """None when the two TSVs agree (numbers within tolerance, the rest exactly), else why not."""
    fa, fb = pd.read_csv(a, sep="\t"), pd.read_csv(b, sep="\t")
    if list(fa.columns) != list(fb.columns) or fa.shape != fb.shape:
        return f"shape/columns differ: {fa.shape} vs {fb.shape}"
    worst = []
    for column in fa.columns:
        x, y = fa[column], fb[column]
        if (
            pd.api.types.is_numeric_dtype(x)
            and pd.api.types.is_numeric_dtype(y)
            and not pd.api.types.is_bool_dtype(x)
        ):
            x, y = x.to_numpy(float), y.to_numpy(float)
            both_nan = np.isnan(x) & np.isnan(y)
            gap = np.where(both_nan, 0.0, np.abs(x - y))
            scale = np.maximum(np.abs(x), np.abs(y))
            bad = ~(gap <= rtol * scale + atol)
            if bad.any():
                rel = float(
                    np.nanmax(np.where(scale > 0, gap / np.where(scale > 0, scale, 1), gap))
                )
                worst.append(f"{column} ({int(bad.sum())} cells, max relative {rel:.2e})")
        elif not x.astype(str).equals(y.astype(str)):
            worst.append(f"{column} (text differs)")
    return "; ".join(worst) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ref", help="git ref whose code the working tree is compared with (CPU)")
    mode.add_argument(
        "--devices", nargs=2, metavar=("A", "B"), help="two devices, this tree's code"
    )
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument(
        "--keep", type=Path, help="run in this folder and keep it (default: a temporary one)"
    )
    args = parser.parse_args()
    with work_folder(args.keep) as base:
        if args.ref:
            runs = {args.ref: (export_ref(args.ref, base), "cpu"), "working tree": (ROOT, "cpu")}
        else:
            runs = {f"device {d}": (ROOT, d) for d in args.devices}
        folders = {}
        for index, (name, (tree, device)) in enumerate(runs.items()):
            folders[name] = base / f"run{index}"
            print(
                f"{name}: {run_tiny(tree, folders[name], device, args.cores):.1f} s wall",
                flush=True,
            )
        (name_a, dir_a), (name_b, dir_b) = folders.items()
        ta, tb = tables(dir_a), tables(dir_b)
        differing = sorted(set(ta) ^ set(tb))
        for name in differing:
            print(f"{name}: only in {'the first' if name in ta else 'the second'} run")
        for name in sorted(set(ta) & set(tb)):
            if args.ref:
                why = None if ta[name].read_bytes() == tb[name].read_bytes() else "bytes differ"
            else:
                why = numeric_difference(ta[name], tb[name], args.rtol, args.atol)
            if why:
                differing.append(name)
                print(f"{name}: {why}")
        criterion = (
            "byte-identical"
            if args.ref
            else f"equal within rtol {args.rtol:g} (atol {args.atol:g})"
        )
        print(
            f"{len(set(ta) & set(tb)) - len([d for d in differing if d in ta and d in tb])} of "
            f"{len(set(ta) | set(tb))} TSVs {criterion} between {name_a} and {name_b}"
        )
        sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
