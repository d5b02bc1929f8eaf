# Helpers shared by every stage (get_* names), and the registry through which each experiment's
# rule file declares its outputs; the targets of `all` and the report's file map come from it.
# Every settings value passed as params is a plain dict or builtin (settings.*_params):
# Snakemake's params rerun-trigger sees only those, so a config edit replans what it feeds.
import re
from pathlib import Path

from lensspace.errors import LensspaceError
from lensspace.settings import (
    ablation_grid_params,
    compute_params,
    experiment_layers,
    layer_jobs,
    lens_training_params,
    seed_layout_layers,
    shuffle_pair_chunks,
    token_split_params,
)
from lensspace.malloc import ask_for_huge_pages
from lensspace.validation import check_config, known_model_facts

# Every job inherits it: glibc's malloc backs large tensors with huge pages (lensspace.malloc).
ask_for_huge_pages()

RESULTS = "results"
RESOURCES = "resources"
REFERENCE = str(Path(workflow.basedir) / "reference" / "seed_tables.tsv")
# What prepare_model writes of a model; read at parse time, before any job, where it exists.
MODEL_MANIFEST = f"{RESOURCES}/models/{{model}}/lensspace-model.json"


wildcard_constraints:
    # a per-layer job's layers: one layer, or several joined by _ (layers_per_job)
    layer=r"\d+(_\d+)*",
    # {run} is always a run of the config: keeps figures/h1_heads_{run}.png from matching h1_{run}.
    run="|".join(re.escape(r) for r in config["runs"]),


def get_model_facts(model):
    """What is known of a model before any job runs (None until a pretrained one is prepared)."""
    manifest = MODEL_MANIFEST.format(model=model)
    return known_model_facts(model, config["models"][model], manifest)


# Refused at parse time: bad references, and settings that do not fit a model already known
# (check_run refuses the rest as soon as a pretrained model is prepared).
try:
    check_config(config, get_model_facts)
except LensspaceError as err:
    raise WorkflowError(f"config: {err}")


def get_run(run):
    return config["runs"][run]


def get_runs_with_lens_source(source):
    """A regex matching exactly the runs whose lens has this source (none: matches nothing)."""
    names = [re.escape(r) for r, spec in config["runs"].items() if spec["lens"]["source"] == source]
    return "|".join(names) if names else "(?!)"


def get_lens_training(wildcards):
    """The run's lens training settings as a plain dict."""
    return lens_training_params(config, wildcards.run)


def get_lens_source(wildcards):
    """Where the run's lens comes from: train, pretrained, ..."""
    return get_run(wildcards.run)["lens"]["source"]


def get_lens_ridge(wildcards):
    """The ridge the run's lens was fitted with (None for a pretrained lens)."""
    trained = get_run(wildcards.run)["lens"]["source"] == "train"
    return lens_training_params(config, wildcards.run)["ridge"] if trained else None


def get_pretrained_lens_files(wildcards):
    """A local pretrained lens folder's files (an edit of them refetches); nothing for a hub id."""
    folder = Path(get_run(wildcards.run)["lens"]["id"])
    return [str(folder / "config.json"), str(folder / "params.pt")] if folder.is_dir() else []


def get_model_manifest(wildcards):
    return MODEL_MANIFEST.format(model=get_run(wildcards.run)["model"])


def get_corpus_text(wildcards):
    return rules.prepare_corpus.output.text.format(corpus=get_run(wildcards.run)["corpus"])


def get_n_layers(run):
    return config["models"][get_run(run)["model"]]["n_layers"]


def get_experiment_layers(run, section):
    return experiment_layers(config, get_n_layers(run), section)


def get_layer_jobs(section):
    """A function of the run: the names of experiment ``section``'s per-layer jobs (its layers,
    ``layers_per_job`` a job)."""
    return lambda run: layer_jobs(get_experiment_layers(run, section), config["layers_per_job"])


def get_expanded(*patterns, **values):
    """Input function: each of ``patterns`` (rules' outputs) for the job's run, with each other
    wildcard it has taken over ``values[name](run)`` (e.g. a per-layer rule's jobs)."""

    def paths(wildcards):
        over = {name: list(items(wildcards.run)) for name, items in values.items()}
        return [
            path
            for pattern in patterns
            for path in expand(
                pattern,
                run=wildcards.run,
                **{name: v for name, v in over.items() if f"{{{name}}}" in pattern},
            )
        ]

    return paths


def get_config_values(*keys):
    """The config's top-level ``keys`` as plain values (an experiment's params: the params
    rerun trigger sees an edit of any of them)."""
    return {key: config[key] for key in keys}


def get_shuffle_chunks(run):
    """The layer shuffle's swap pairs of a run, in batches (one job each)."""
    return shuffle_pair_chunks(config, get_n_layers(run))


def get_eval_corpora(run):
    """The run's out-of-distribution corpora (keys of corpora:)."""
    return list(get_run(run).get("eval_corpora", []))


def get_run_readouts(run):
    """The run's readouts (keys of readouts.define)."""
    return list(get_run(run).get("readouts", []))


def get_readout_layers(run):
    """The layers a run's readouts are read at (readouts.layers; null: those of h0), unless a
    definition names its own."""
    return seed_layout_layers(config, "readouts", get_n_layers(run))


def get_readout_residual_layers(run):
    """The residuals a run's readouts read on its eval corpora: the layers of its masked readouts
    and probes (a back half is read on the run's own corpus only) and the final one."""
    defined = config["readouts"]["define"]
    wanted = {get_n_layers(run)}
    for name in get_run_readouts(run):
        if defined[name]["kind"] != "back_half":
            wanted |= set(defined[name].get("layers") or get_readout_layers(run))
    return sorted(wanted)


def get_readout_settings(wildcards):
    """One readout's settings: its definition, layers and modes, and only the blocks its kind
    reads (a probe's fit, a back half's Jacobian and lens training)."""
    spec = config["readouts"]["define"][wildcards.readout]
    settings = {
        "spec": spec,
        "layers": spec.get("layers") or get_readout_layers(wildcards.run),
        "modes": config["readouts"]["modes"],
    }
    if spec["kind"] == "probe":
        settings["probe"] = config["readouts"]["probe"]
    if spec["kind"] == "back_half":
        settings["back_half"] = config["readouts"]["back_half"]
        settings["lens_training"] = lens_training_params(config, wildcards.run)
    return settings


def get_node_jobs(run):
    """The node experiment's per-layer jobs of a run (nodes.layers; null: those of h0)."""
    layers = seed_layout_layers(config, "nodes", get_n_layers(run))
    return layer_jobs(layers, config["layers_per_job"])


def get_node_settings():
    """The nodes block without its layers (they choose the jobs, not what a job computes) and
    the verdicts' margin (the scores' rule takes it)."""
    skip = {"layers", "min_r2_gain"}
    return {key: value for key, value in config["nodes"].items() if key not in skip}


def get_compute():
    """Batch sizes per device and the TF32 switch, as plain values (seen by the params trigger)."""
    return compute_params(config)


def get_token_split(wildcards):
    return token_split_params(config, wildcards.run)


def get_ablation_grid(section):
    return ablation_grid_params(config, section)


def get_reference_table(run, hypothesis):
    return get_run(run).get("reference", {}).get(hypothesis, "")


def get_robustness_files(experiment):
    """The robustness rule's outputs for ablation experiment ``experiment`` (registry patterns)."""
    outputs = rules.robustness_table.output
    return {
        key: expand(outputs[name], experiment=experiment, allow_missing=True)[0]
        for key, name in (("comparisons", "comparisons"), ("robustness", "markdown"))
    }


# ---------------------------------------------------------------- the experiment registry
EXPERIMENTS = {}


def register_experiment(name, files, section=None, items=None, applies=None):
    """Declare experiment ``name``'s outputs, once, at the end of its rule file.

    ``files`` maps each key its report section reads to a rule's output pattern (wildcard
    ``{run}``). A pattern with a wildcard named in ``items`` (name -> function of the run giving
    the items) becomes a dict {item: path}. ``section`` is the module of lensspace.report that
    shows them (None: none); ``applies`` (a function of the run) limits the runs it has.
    """
    if name in EXPERIMENTS:
        raise WorkflowError(f"experiment {name!r} is registered twice")
    EXPERIMENTS[name] = {
        "files": files,
        "section": section,
        "items": items or {},
        "applies": applies,
    }


def get_experiment_files(name, run):
    """Experiment ``name``'s outputs for ``run``: key -> path, or key -> {item: path}."""
    experiment = EXPERIMENTS[name]
    if experiment["applies"] is not None and not experiment["applies"](run):
        return {}
    files = {}
    for key, pattern in experiment["files"].items():
        over = [name for name in experiment["items"] if f"{{{name}}}" in pattern]
        if not over:
            files[key] = expand(pattern, run=run)[0]
            continue
        (name,) = over
        files[key] = {
            item: expand(pattern, run=run, **{name: item})[0]
            for item in experiment["items"][name](run)
        }
    return files


def get_experiment_paths(run):
    """Every registered output of ``run``, as a flat list of paths."""
    paths = []
    for name in EXPERIMENTS:
        for value in get_experiment_files(name, run).values():
            paths += list(value.values()) if isinstance(value, dict) else [value]
    return paths


def get_report_inputs(wildcards):
    """Every file the report shows: the registered outputs of every run."""
    return [path for run in config["runs"] for path in get_experiment_paths(run)]


def get_report_experiments():
    """The report's file map, in registration order: name, section module, files per run."""
    return [
        {
            "name": name,
            "section": experiment["section"],
            "files": {run: get_experiment_files(name, run) for run in config["runs"]},
        }
        for name, experiment in EXPERIMENTS.items()
    ]


def get_final_outputs():
    """The targets of `all`: every registered output of every run, and the report page."""
    return [*get_report_inputs(None), rules.html_report.output.html]


def get_circuit_tasks(run):
    """The run's circuit-search tasks (runs.*.circuit_tasks)."""
    return list(get_run(run).get("circuit_tasks", []))


def get_circuit_fractions(run):
    """The fractions of nodes the cut-down searches keep, as their jobs' names."""
    return [str(f) for f in config["circuit_search"]["fractions"]]


def get_circuit_fraction_files(pattern):
    """Input function: ``pattern`` for the job's run and task at every fraction."""

    def paths(wildcards):
        return expand(
            pattern,
            run=wildcards.run,
            task=wildcards.task,
            fraction=get_circuit_fractions(wildcards.run),
        )

    return paths


def get_job_circuit_tasks(wildcards):
    """Params function: the job's run's circuit-search tasks, in the table's order."""
    return get_circuit_tasks(wildcards.run)


def get_circuit_settings(*keys):
    """The circuit_search keys a rule's jobs use (its params: an edit of another key replans
    nothing of it)."""
    return {key: config["circuit_search"][key] for key in keys}
