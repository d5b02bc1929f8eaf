# Helpers shared by every stage: config look-ups and target lists (get_* names only).
# Every settings value passed as params is a plain dict or builtin (settings.*_params):
# Snakemake's params rerun-trigger sees only those, so a config edit replans what it feeds.
import re
from pathlib import Path

from lensspace.errors import LensspaceError
from lensspace.settings import (
    ablation_grid_params,
    check_config,
    circuit_params,
    compute_params,
    embedding_lens_params,
    experiment_layers,
    layer_jobs,
    known_model_facts,
    lens_training_params,
    ridge_lens_params,
    second_ridge,
    shuffle_pair_chunks,
    shuffle_params,
    token_split_params,
)
from lensspace.malloc import ask_for_huge_pages

# Every job inherits it: glibc's malloc backs large tensors with huge pages (lensspace.malloc).
ask_for_huge_pages()

RESULTS = "results"
RESOURCES = "resources"
REFERENCE = str(Path(workflow.basedir) / "reference" / "seed_tables.tsv")


wildcard_constraints:
    # a per-layer job's layers: one layer, or several joined by _ (layers_per_job)
    layer=r"\d+(_\d+)*",
    # {run} is always a run of the config: keeps figures/h1_heads_{run}.png from matching h1_{run}.
    run="|".join(re.escape(r) for r in config["runs"]),


def get_model_facts(model):
    """What is known of a model before any job runs (None until a pretrained one is prepared)."""
    manifest = f"{RESOURCES}/models/{model}/lensspace-model.json"
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


def get_model_manifest(wildcards):
    return f"{RESOURCES}/models/{get_run(wildcards.run)['model']}/lensspace-model.json"


def get_corpus_text(wildcards):
    return f"{RESOURCES}/corpora/{get_run(wildcards.run)['corpus']}.txt"


def get_n_layers(run):
    return config["models"][get_run(run)["model"]]["n_layers"]


def get_experiment_layers(run, section):
    return experiment_layers(config, get_n_layers(run), section)


def get_layer_jobs(run, section):
    """The names of experiment ``section``'s per-layer jobs: its layers, ``layers_per_job`` a job."""
    return layer_jobs(get_experiment_layers(run, section), config["layers_per_job"])


def get_layer_tables(section, folder="layers"):
    """Input function: the per-job TSVs of experiment ``section`` (h0, h1, h2) for a run."""

    def layer_tables(wildcards):
        return expand(
            f"{RESULTS}/{{run}}/{section}/{folder}/{{layer}}.tsv",
            run=wildcards.run,
            layer=get_layer_jobs(wildcards.run, section),
        )

    return layer_tables


def get_embedding_lens_settings(wildcards):
    return embedding_lens_params(config)


def get_shuffle_chunks(run):
    return shuffle_pair_chunks(config, get_n_layers(run))


def get_shuffle_pairs(wildcards):
    return get_shuffle_chunks(wildcards.run)[int(wildcards.chunk)]


def get_shuffle_tables(wildcards):
    chunks = range(len(get_shuffle_chunks(wildcards.run)))
    return [
        *expand(f"{RESULTS}/{{run}}/shuffle/pairs/{{chunk}}.tsv", run=wildcards.run, chunk=chunks),
        f"{RESULTS}/{wildcards.run}/shuffle/windows.tsv",
    ]


def get_compute():
    """Batch sizes per device and the TF32 switch, as plain values (seen by the params trigger)."""
    return compute_params(config)


def get_lens_training(wildcards):
    return lens_training_params(config, wildcards.run)


def get_pretrained_lens_files(wildcards):
    """A local pretrained lens folder's files (an edit of them refetches); nothing for a hub id."""
    folder = Path(get_run(wildcards.run)["lens"]["id"])
    return [str(folder / "config.json"), str(folder / "params.pt")] if folder.is_dir() else []


def get_lens_ridge(wildcards):
    """The ridge the run's lens was fitted with (None for a pretrained lens)."""
    trained = get_run(wildcards.run)["lens"]["source"] == "train"
    return lens_training_params(config, wildcards.run)["ridge"] if trained else None


def get_ridge_lens_training(wildcards):
    return ridge_lens_params(config["shuffle"], config["seed"])


def get_shuffle_settings(windows):
    return shuffle_params(config, windows)


def get_circuit_settings(wildcards):
    return circuit_params(config)


def get_shuffle_ridge_lens(wildcards):
    """The second lens of the lens_ridge space, where that space is on (else nothing)."""
    if second_ridge(config["shuffle"]) is None:
        return []
    return f"{RESULTS}/{wildcards.run}/shuffle/ridge_lens/params.pt"


def get_token_split(wildcards):
    return token_split_params(config, wildcards.run)


def get_ablation_grid(section):
    return ablation_grid_params(config, section)


def get_lens_quality_config():
    """The config keys the lens-quality sweep reads, as plain values (seen by the params trigger)."""
    return {key: config[key] for key in ("lens_quality", "h0", "random_draws", "bootstrap", "seed")}


def get_lens_training_values(wildcards):
    """The run's lens training settings as a plain dict."""
    return lens_training_params(config, wildcards.run)


def get_ood_config():
    """The config keys the out-of-distribution evaluation reads, as plain values."""
    return {key: config[key] for key in ("ood", "h0", "random_draws", "bootstrap", "seed")}


def get_eval_corpora(run):
    return list(get_run(run).get("eval_corpora", []))


def get_ood_tables(name):
    """Input function: ``name``.tsv of every eval corpus of the run."""

    def tables(wildcards):
        return [
            f"{RESULTS}/{wildcards.run}/ood/{corpus}/{name}.tsv"
            for corpus in get_eval_corpora(wildcards.run)
        ]

    return tables


def get_neuron_config():
    """The config keys the neuron experiment reads, as plain values (seen by the params trigger)."""
    return {key: config[key] for key in ("neurons", "random_draws", "bootstrap", "seed")}


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
        f"{RESULTS}/report/index.html",
        *expand(f"{RESULTS}/{{run}}/h1/ablation.tsv", run=runs),
        *expand(f"{RESULTS}/tables/h1_{{run}}.md", run=runs),
        *expand(f"{RESULTS}/figures/h1_{{run}}.png", run=runs),
        *expand(f"{RESULTS}/{{run}}/h1/heads.tsv", run=runs),
        *expand(f"{RESULTS}/figures/h1_heads_{{run}}.png", run=runs),
        *expand(f"{RESULTS}/{{run}}/h2/ablation.tsv", run=runs),
        *expand(f"{RESULTS}/tables/h2_{{run}}.md", run=runs),
        *expand(f"{RESULTS}/figures/h2_{{run}}.png", run=runs),
        *expand(f"{RESULTS}/{{run}}/shuffle/swaps.tsv", run=runs),
        *expand(f"{RESULTS}/figures/shuffle_{{run}}.png", run=runs),
        *[
            f"{RESULTS}/{kind}/ood_{run}.{ext}"
            for run in runs
            if get_eval_corpora(run)
            for kind, ext in (("tables", "md"), ("figures", "png"))
        ],
        *expand(f"{RESULTS}/{{run}}/lens_quality/sweep.tsv", run=runs),
        *expand(f"{RESULTS}/tables/lens_quality_{{run}}.md", run=runs),
        *expand(f"{RESULTS}/figures/lens_quality_{{run}}.png", run=runs),
        *expand(f"{RESULTS}/{{run}}/neurons/candidates.tsv", run=runs),
        *expand(f"{RESULTS}/tables/neurons_{{run}}.md", run=runs),
        *expand(f"{RESULTS}/figures/neurons_{{run}}.png", run=runs),
    ]


# Ablation experiments (results/{run}/{name}/ablation.tsv) the report shows when their rules exist.
REPORT_EXPERIMENTS = ["h0", "h1", "h2"]


def get_producible(paths):
    """The paths that some rule of the workflow can produce (stages not included are left out)."""
    return [p for p in paths if any(rule.is_producer(p) for rule in workflow.rules)]


def get_report_inputs(wildcards):
    """Every file the report page shows, for every run, among those the DAG can produce."""
    wanted = []
    for run in config["runs"]:
        wanted += [
            f"{RESULTS}/{run}/lens_eval.tsv",
            f"{RESULTS}/figures/lens_{run}.png",
            f"{RESOURCES}/models/{get_run(run)['model']}/lensspace-model.json",
        ]
        for name in REPORT_EXPERIMENTS:
            if get_producible([f"{RESULTS}/{run}/{name}/ablation.tsv"]):
                wanted += [
                    f"{RESULTS}/tables/robustness_{name}_{run}.md",
                    f"{RESULTS}/{run}/{name}/comparisons.tsv",
                ]
            wanted += [
                f"{RESULTS}/{run}/{name}/ablation.tsv",
                f"{RESULTS}/tables/{name}_{run}.md",
                f"{RESULTS}/figures/{name}_{run}.png",
            ]
        wanted += [f"{RESULTS}/{run}/h1/{name}.tsv" for name in ("heads", "heads_test", "mlp")]
        wanted += [
            f"{RESULTS}/{run}/h0/shares.tsv",
            f"{RESULTS}/{run}/h2/fit.tsv",
            f"{RESULTS}/{run}/shuffle/windows.tsv",
            f"{RESULTS}/{run}/shuffle/conditions.tsv",
        ]
        wanted += [
            f"{RESULTS}/figures/h1_heads_{run}.png",
            f"{RESULTS}/{run}/shuffle/swaps.tsv",
            f"{RESULTS}/figures/shuffle_{run}.png",
        ]
        for corpus in get_eval_corpora(run):
            wanted += [
                f"{RESULTS}/{run}/ood/{corpus}/{name}.tsv" for name in ("lens_eval", "ablation")
            ]
        if get_eval_corpora(run):
            wanted += [f"{RESULTS}/tables/ood_{run}.md", f"{RESULTS}/figures/ood_{run}.png"]
        wanted += [
            f"{RESULTS}/{run}/lens_quality/sweep.tsv",
            f"{RESULTS}/tables/lens_quality_{run}.md",
            f"{RESULTS}/figures/lens_quality_{run}.png",
        ]
        wanted += [
            f"{RESULTS}/{run}/neurons/{name}.tsv"
            for name in ("neurons", "candidates", "joint", "reference")
        ]
        wanted += [f"{RESULTS}/tables/neurons_{run}.md", f"{RESULTS}/figures/neurons_{run}.png"]
    return get_producible(wanted)
