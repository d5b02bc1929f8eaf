# Helpers shared by every stage: config look-ups and target lists (get_* names only).
import re
from pathlib import Path

from lensspace.errors import LensspaceError
from lensspace.settings import check_references, h0_layers

try:
    check_references(config)
except LensspaceError as err:
    raise WorkflowError(f"config: {err}")


RESULTS = "results"
RESOURCES = "resources"
REFERENCE = str(Path(workflow.basedir) / "reference" / "seed_tables.tsv")


wildcard_constraints:
    layer=r"\d+",


def get_run(run):
    return config["runs"][run]


def get_runs_with_lens_source(source):
    """A regex matching exactly the runs whose lens has this source (none: matches nothing)."""
    names = [re.escape(r) for r, spec in config["runs"].items() if spec["lens"]["source"] == source]
    return "|".join(names) if names else "(?!)"


def get_model_manifest(wildcards):
    return f"{RESOURCES}/models/{get_run(wildcards.run)['model']}/lensspace-model.json"


def get_corpus_text(wildcards):
    return f"{RESOURCES}/corpora/{get_run(wildcards.run)['corpus']}.txt"


def get_n_layers(run):
    return config["models"][get_run(run)["model"]]["n_layers"]


def get_h0_layers(run):
    return h0_layers(config, get_n_layers(run))


def get_h0_layer_tables(wildcards):
    return expand(
        f"{RESULTS}/{{run}}/h0/layers/{{layer}}.tsv",
        run=wildcards.run,
        layer=get_h0_layers(wildcards.run),
    )


def get_reference_table(run, hypothesis):
    return get_run(run).get("reference", {}).get(hypothesis, "")


def get_final_outputs():
    runs = list(config["runs"])
    return [
        *expand(f"{RESULTS}/{{run}}/lens_eval.tsv", run=runs),
        *expand(f"{RESULTS}/{{run}}/svd/spectrum.tsv", run=runs),
        *expand(f"{RESULTS}/{{run}}/h0/ablation.tsv", run=runs),
        *expand(f"{RESULTS}/tables/h0_{{run}}.md", run=runs),
        *expand(f"{RESULTS}/figures/h0_{{run}}.png", run=runs),
        *expand(f"{RESULTS}/figures/lens_{{run}}.png", run=runs),
    ]
