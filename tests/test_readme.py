"""The README's two commands are what CI and users run: keep them present and in agreement."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in readme
    assert "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/snakemake" in readme
