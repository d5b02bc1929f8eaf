# lensspace: the lens-aligned predictive space of tuned lenses, as a reproducible study.
# This file only validates the config, includes the stages and names the targets;
# the rules live in rules/, their code in scripts/ (thin) and src/lensspace/ (the library).
from snakemake.utils import min_version

from lensspace.configfile import check_duplicate_keys, validate_config
from lensspace.errors import LensspaceError

min_version("9.0")


# The embedded default; a study given with --configfile replaces it rather than merging
# into it (merging would add the default's runs to every study).
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config.yaml"


# Before any job: no key given twice in a config file, and the schema (defaults filled in).
try:
    for path in workflow.configfiles:
        check_duplicate_keys(path)
    validate_config(config, f"{workflow.basedir}/schemas/config.schema.yaml")
except LensspaceError as err:
    raise WorkflowError(f"config: {err}")


report: "report/workflow.rst"


# The stages in order. Each experiment's rule file registers its outputs (register_experiment),
# so one include line is all a new experiment adds here; the report comes last and shows them.
include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/activations.smk"
include: "rules/lenses.smk"
include: "rules/svd.smk"
include: "rules/robustness.smk"
include: "rules/h0.smk"
include: "rules/h1.smk"
include: "rules/h2.smk"
include: "rules/shuffle.smk"
include: "rules/ood.smk"
include: "rules/lens_quality.smk"
include: "rules/neurons.smk"
include: "rules/readouts.smk"
include: "rules/nodes.smk"
include: "rules/circuit_search.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
