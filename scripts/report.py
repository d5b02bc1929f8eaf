"""The report page: every run's sections and the provenance, as one self-contained HTML file."""

from pathlib import Path

from lensspace import runtime
from lensspace.report import build


def body(sm):
    # The registry hands the page every experiment's files; the benchmark files (provenance)
    # lie beside the page's folder: results/report/index.html, results/benchmarks/.
    page = build(
        sm.params.config,
        sm.params.experiments,
        results=Path(sm.output.html).parents[1],
        reference=sm.input.reference,
        workflow_dir=Path(sm.scriptdir).parent,
    )
    runtime.write_text(page, sm.output.html)
    print(f"[lensspace] report: {Path(sm.output.html).stat().st_size / 1e6:.1f} MB", flush=True)


runtime.main(snakemake, body)  # noqa: F821
