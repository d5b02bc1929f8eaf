"""The report page: every run's sections and the provenance, as one self-contained HTML file."""

from pathlib import Path

from lensspace import runtime
from lensspace.report import build


def body(sm):
    # The folders follow from the files: results/report/index.html, resources/models/{m}/*.json.
    manifests = [Path(p) for p in sm.input.shown if p.endswith("lensspace-model.json")]
    page = build(
        sm.params.config,
        results=Path(sm.output.html).parents[1],
        reference=sm.input.reference,
        resources=manifests[0].parents[2] if manifests else Path("resources"),
        workflow_dir=Path(sm.scriptdir).parent,
    )
    runtime.write_text(page, sm.output.html)
    print(f"[lensspace] report: {Path(sm.output.html).stat().st_size / 1e6:.1f} MB", flush=True)


runtime.main(snakemake, body)  # noqa: F821
