"""Check the run's model-dependent settings against its prepared model, before any heavy job."""
import json
from pathlib import Path

from lensspace import runtime
from lensspace.settings import check_model_fit, manifest_facts


def body(sm):
    facts = manifest_facts(sm.input.model)
    model = json.loads(Path(sm.input.model).read_text())["name"]
    check_model_fit(sm.params.checks, facts, model, sm.wildcards.run)
    runtime.write_text(json.dumps({"model": model, **facts, "checked": sm.params.checks},
                                  indent=2, sort_keys=True), sm.output.checked)


runtime.main(snakemake, body)  # noqa: F821
