"""The interface of a report section, and the context every section reads.

Each experiment that registers ``section="lensspace.report.<name>"`` (see
``register_experiment`` in ``rules/common.smk``) has a module here with two functions:

``section(run, files, context) -> Section | None``
    The run's part of the page: blocks (:class:`~lensspace.report.blocks.Text`, ``Figure``,
    ``Table``, ``Grid``) built from ``files``, or None where the run has none of them.
``finding(run, files, context) -> Finding | None``
    The experiment's entry in the run's findings at the top of the page: one plain sentence of
    what it found, computed from its tables (which condition costs more, by how much, where),
    then the counts and procedures behind it.

``files`` is what the experiment registered for ``run``: key -> path, or key -> {item: path}
for an itemised key. A section reads only those paths (and, through ``context.files``, the
paths another experiment registered); it types none itself.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pandas as pd

from lensspace.report.blocks import Figure


@dataclass
class Context:
    """What sections share: the config, every experiment's files per run, the reference table."""

    config: dict
    experiments: list[dict] = field(default_factory=list)  # the workflow's registry, in order
    reference: Path | None = None  # the published numbers (reference/seed_tables.tsv)

    def files(self, name: str, run: str) -> dict:
        """The files experiment ``name`` registered for ``run`` ({} where it has none)."""
        for experiment in self.experiments:
            if experiment["name"] == name:
                return experiment["files"].get(run, {})
        return {}

    def spec(self, run: str) -> dict:
        return self.config["runs"][run]

    @property
    def n_resamples(self) -> int:
        return int(self.config.get("bootstrap", {}).get("n_resamples", 0))

    def reference_name(self, run: str, key: str) -> str:
        return self.spec(run).get("reference", {}).get(key, "")

    def d_model(self, run: str) -> int | None:
        """The run's model width: from its prepared manifest, else from the config."""
        model = self.spec(run)["model"]
        manifest = self.files("model", run).get("manifest", {}).get(model)
        if manifest is not None and Path(manifest).exists():
            return int(json.loads(Path(manifest).read_text())["d_model"])
        return self.config["models"][model].get("d_model")


def module(name: str) -> ModuleType:
    """The section module registered as ``name`` (a module path such as lensspace.report.h0)."""
    return importlib.import_module(name)


def existing(path) -> Path | None:
    """``path`` as a Path where the file exists (a registered file the run has not made: None)."""
    return Path(path) if path is not None and Path(path).exists() else None


def read_tsv(path) -> pd.DataFrame:
    """A TSV that may hold a header only (or nothing at all, when a stage had no rows)."""
    try:
        return pd.read_csv(path, sep="\t")
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def figure(path, caption: str) -> list:
    """The registered figure at ``path`` as a block, where the run has made it ([] if not)."""
    found = existing(path)
    return [Figure(found, caption)] if found is not None else []
