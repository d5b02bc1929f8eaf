"""Check the run's model-dependent settings against its prepared model, before any heavy job.

The settings come from the config, not from params (see the rule in rules/model.smk): this job
runs once the model is prepared; later edits are checked when the Snakefile is parsed."""

import json
from pathlib import Path

from lensspace import runtime
from lensspace.validation import check_model_fit, manifest_facts, model_checks


def body(sm):
    facts = manifest_facts(sm.input.model)
    model = json.loads(Path(sm.input.model).read_text())["name"]
    check_model_fit(model_checks(sm.config, sm.wildcards.run), facts, model, sm.wildcards.run)
    runtime.write_text(
        json.dumps({"model": model, **facts}, indent=2, sort_keys=True), sm.output.checked
    )


runtime.main(snakemake, body)  # noqa: F821
