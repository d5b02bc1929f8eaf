"""The page: for each run, the findings and one section per registered experiment, then the
provenance, assembled into one self-contained HTML string."""

from __future__ import annotations

from pathlib import Path

from lensspace.report import provenance, render
from lensspace.report.blocks import Finding, Section, Text
from lensspace.report.render import esc
from lensspace.report.sections import Context, module

INTRODUCTION = (
    "All KL values are in nats, means over held-out token positions (position 0 excluded), with "
    "95% bootstrap intervals over sequences. Every number and figure here is read from this "
    "run's results."
)


def findings_section(findings: list[Finding]) -> Section | None:
    """The run's conclusions: per experiment a plain sentence of what it found, then the counts
    and procedures behind it."""
    if not findings:
        return None
    items = "".join(f"<li>{esc(finding.text())}</li>" for finding in findings)
    return Section("findings", "Findings", [Text(f"<ul>{items}</ul>", html=True)])


def run_sections(run: str, context: Context) -> list[Section]:
    """The run's findings, then each registered experiment's section, in registration order."""
    sections, findings = [], []
    for experiment in context.experiments:
        if experiment["section"] is None:
            continue
        files = experiment["files"].get(run, {})
        if not files:
            continue
        shown = module(experiment["section"])
        found = shown.finding(run, files, context)
        if found is not None:
            findings.append(found)
        section = shown.section(run, files, context)
        if section is not None:
            sections.append(section)
    summary = findings_section(findings)
    return ([summary] if summary is not None else []) + sections


def build(
    config: dict,
    experiments: list[dict],
    results: str | Path,
    reference: str | Path | None,
    workflow_dir: str | Path = ".",
) -> str:
    """The whole page as one HTML string.

    ``experiments`` is the workflow's registry as the report rule passes it: in registration
    order, {"name", "section" (a module such as lensspace.report.h0, or None), "files": {run:
    {key: path or {item: path}}}}. ``results`` is where the benchmark files live (provenance).
    """
    context = Context(config, experiments, Path(reference) if reference else None)
    body, toc = [], []
    for run in config["runs"]:
        sections = run_sections(run, context)
        toc.append(
            f"<li><a href='#{esc(run)}'>{esc(run)}</a>: "
            + ", ".join(
                f"<a href='#{render.anchor(run, s.key)}'>{esc(s.title)}</a>" for s in sections
            )
            + "</li>"
        )
        spec = context.spec(run)
        parts = [
            f"<section class='run' id='{esc(run)}' data-run='{esc(run)}'><h2>Run {esc(run)}</h2>",
            f"<p>Model <b>{esc(spec['model'])}</b>, corpus <b>{esc(spec['corpus'])}</b>, lens "
            f"source <b>{esc(spec['lens']['source'])}</b>.</p>",
            *(render.section(s, render.anchor(run, s.key)) for s in sections),
        ]
        body.append("".join(parts) + "</section>")
    toc.append("<li><a href='#provenance'>Provenance</a></li>")
    body.append(
        render.section(
            provenance.section(config, Path(results), Path(workflow_dir)), "provenance", "h2"
        )
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>lensspace report</title><style>{render.STYLE}</style></head><body>"
        "<h1>lensspace: the lens-aligned predictive space of tuned lenses</h1>"
        f"<p>Runs: {', '.join(esc(r) for r in config['runs'])}. {INTRODUCTION}</p>"
        f"<nav><b>Contents</b><ul>{''.join(toc)}</ul></nav>{''.join(body)}</body></html>"
    )
