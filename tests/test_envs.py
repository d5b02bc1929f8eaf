"""envs/*.yaml (for `--sdm conda`) pin exactly what pyproject.toml pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Packages of the workflow engine itself: they run on the submit host, outside the rules'
# environment, so envs/ need not (and does not) carry them.
ENGINE = {"snakemake", "snakemake-executor-plugin-slurm"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)\s*", req)
        assert match, f"not an exact pin: {req!r}"
        out[canonical(match[1])] = match[2]
    return out


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def env_files() -> list[Path]:
    return sorted((ROOT / "envs").glob("*.yaml"))


def conda_pins(env: dict) -> tuple[dict[str, str], list[str]]:
    """(pip pins, conda dependencies) of one environment file."""
    pip, conda = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip.extend(dep.get("pip", []))
        else:
            conda.append(dep)
    return pins(pip), conda


def test_every_env_pins_what_pyproject_pins():
    wanted = {
        name: version
        for name, version in pins(project()["dependencies"]).items()
        if name not in ENGINE
    }
    assert env_files()
    for path in env_files():
        ours, conda = conda_pins(yaml.safe_load(path.read_text()))
        assert ours == wanted, f"{path.name}: pins differ from pyproject.toml"
        assert "pip" in conda


def test_env_python_is_the_projects_python():
    requires = project()["requires-python"]  # ">=3.11,<3.12"
    low = re.search(r">=\s*(\d+\.\d+)", requires)[1]
    high = re.search(r"<\s*(\d+)\.(\d+)", requires)
    for path in env_files():
        _, conda = conda_pins(yaml.safe_load(path.read_text()))
        python = [d for d in conda if d.startswith("python")]
        assert python == [f"python={low}"], path.name
        assert (int(high[1]), int(high[2])) == (int(low.split(".")[0]), int(low.split(".")[1]) + 1)


def test_every_rule_names_an_existing_env():
    for smk in (ROOT / "rules").glob("*.smk"):
        for env in re.findall(r"conda:\s*\n\s*\"([^\"]+)\"", smk.read_text()):
            assert (smk.parent / env).resolve().is_file(), f"{smk.name}: {env}"
