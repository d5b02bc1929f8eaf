"""A config edit after a finished run replans exactly the rules it feeds (a dry run per schema key),
and a run killed with SIGKILL, unlocked and rerun gives the TSVs of a clean run."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import yaml
from conftest import ROOT, snakemake

from lensspace.experiments.circuit_search import TIMED_COLUMNS

# Who reads whose outputs (written from the rules' inputs, independently of Snakemake). check_run
# is an ancient() input: its consumers wait for it, but a re-check replans nothing else; it has
# no params (settings edits are checked at parse time), so it is planned only with the model.
LENS_USERS = {
    "eval_lens",
    "h0_layer",
    "h1_layer",
    "h1_heads",
    "h2_layer",
    "shuffle_pairs",
    "shuffle_windows",
    "ood",
    "neurons",
    "readout",
    "nodes_layer",
}
BEYOND = {
    "lens_quality",
    "ood",
    "neurons",
    "readout",
}  # torch rules beyond H0-H2: each reads the model, tokens, cache, bases
OOD_RULES = {
    "ood_tokenize",
    "ood",
    "ood_table",
}  # only runs with eval_corpora (tiny-llama) have them
CIRCUIT_MODEL_USERS = {"circuit_labels", "circuit_task", "circuit_full", "circuit_fraction"}
CIRCUIT_JOBS = {"circuit_task", "circuit_full", "circuit_fraction"}  # they build the prompts
CIRCUIT_RULES = {
    *CIRCUIT_MODEL_USERS,
    "circuit_summary",
    "circuit_search_table",
}  # only runs with circuit_tasks (tiny-llama) have them
READOUT_RULES = {
    "readouts_residuals",
    "readout",
    "readouts_table",
}  # only runs with readouts (tiny-llama) have them
CONSUMERS = {
    "prepare_corpus": {"tokenize"},
    "prepare_model": {
        "tokenize",
        "check_run",
        "cache_activations",
        "train_lens",
        "fetch_lens",
        "eval_lens",
        "svd",
        "h0_layer",
        "h0_table",
        "h1_layer",
        "h1_table",
        "h1_heads",
        "h2_layer",
        "ridge_lens",
        "shuffle_pairs",
        "shuffle_windows",
        "shuffle_figure",
        "html_report",
        "ood_tokenize",
        "readouts_residuals",
        "nodes_layer",
        *CIRCUIT_MODEL_USERS,
        *BEYOND,
    },
    "tokenize": {
        "cache_activations",
        "train_lens",
        "eval_lens",
        "h0_layer",
        "h1_layer",
        "h1_heads",
        "h2_layer",
        "ridge_lens",
        "shuffle_pairs",
        "shuffle_windows",
        "ood_tokenize",
        "nodes_layer",
        *BEYOND,
    },
    "check_run": set(),
    "cache_activations": {
        "train_lens",
        "eval_lens",
        "h0_layer",
        "h1_layer",
        "h2_layer",
        "ridge_lens",
        "shuffle_pairs",
        "shuffle_windows",
        "nodes_layer",
        *BEYOND,
    },
    "train_lens": LENS_USERS,
    "fetch_lens": LENS_USERS,
    "svd": {"h0_layer", "h1_layer", "h1_heads", "nodes_layer", *BEYOND},
    "ridge_lens": {"shuffle_pairs", "shuffle_windows"},
    "eval_lens": {"lens_figure", "html_report", "ood_table"},
    **{f"{h}_layer": {f"{h}_merge"} for h in ("h0", "h1", "h2")},
    **{
        f"{h}_merge": {f"{h}_table", f"{h}_figure", "robustness_table", "html_report"}
        for h in ("h0", "h1", "h2")
    },
    "h0_merge": {"h0_table", "h0_figure", "robustness_table", "html_report", "ood_table"},
    "lens_quality": {"lens_quality_table", "lens_quality_figure", "html_report"},
    "ood_tokenize": {"ood", "readouts_residuals", "html_report"},
    "readouts_residuals": {"readout"},
    "readout": {"readouts_table", "html_report"},
    "readouts_table": {"html_report"},
    "ood": {"ood_table", "html_report"},
    "neurons": {"neurons_table", "neurons_figure", "html_report"},
    "h1_heads": {"h1_heads_figure", "nodes", "circuit_labels", "html_report"},
    "circuit_labels": {"circuit_fraction"},
    "circuit_task": {
        "circuit_full",
        "circuit_fraction",
        "circuit_search_table",
        "html_report",
    },
    "circuit_full": {"circuit_fraction", "circuit_summary"},
    "circuit_fraction": {"circuit_summary"},
    "circuit_summary": {"circuit_search_table", "html_report"},
    "circuit_search_table": {"html_report"},
    "nodes_layer": {"nodes"},
    "nodes": {"nodes_table", "html_report"},
    "nodes_table": {"html_report"},
    "shuffle_pairs": {"shuffle_merge"},
    "shuffle_windows": {"shuffle_merge", "html_report"},
    "shuffle_merge": {"shuffle_figure", "html_report"},
}


def planned_by(fed: set[str]) -> set[str]:
    """The rules a dry run must plan when the rules in ``fed`` see a changed setting: those, what
    reads their outputs, and the report (its page shows the whole config, so every edit)."""
    planned, todo = set(), [*fed, "html_report"]
    while todo:
        rule = todo.pop()
        if rule not in planned:
            planned.add(rule)
            todo += CONSUMERS.get(rule, ())
    return planned


LAYER_RULES = {"h0_layer", "h1_layer", "h2_layer"}
AFTER_CACHE = {"cache_activations"}
SHUFFLE = {"shuffle_pairs", "shuffle_windows"}
DEVICE = {
    "cache_activations",
    "train_lens",
    "eval_lens",
    *LAYER_RULES,
    "h1_heads",
    "ridge_lens",
    *SHUFFLE,
    *BEYOND,
    "readouts_residuals",
    "nodes_layer",
    "circuit_full",
    "circuit_fraction",
}
SEED = {
    "train_lens",
    "eval_lens",
    *LAYER_RULES,
    "h1_heads",
    "ridge_lens",
    *SHUFFLE,
    "robustness_table",
    *BEYOND,
    "ood_tokenize",
    "nodes_layer",
    "nodes",
    *CIRCUIT_JOBS,
    "circuit_summary",
}
N_BOOT = {"eval_lens", *LAYER_RULES, "h1_heads", *SHUFFLE, *BEYOND, "nodes", "circuit_summary"}
H0_READERS = {
    "lens_quality",
    "ood",
    "readouts_residuals",
    "readout",
    "nodes_layer",
}  # they take H0's layers (theirs are null); lens quality and ood read the h0 section
MODEL = {"prepare_model"}
CORPUS = {"prepare_corpus"}
LLAMA = ("models", "tiny-llama")  # the model of runs tiny-llama and tiny-llama-pretrained
TEXT = ("corpora", "tiny-text")
COPY = "copy_of_corpus.txt"  # relative to the working directory, written by the test

# Schema key -> (the edit: (path, value) pairs on the finished tiny run's config, the rules the
# key feeds). Runs: tiny-llama and tiny-gpt2 (trained lenses), tiny-llama-pretrained.
EDITS = {
    "device": ([(("device",), "auto")], DEVICE),
    "seed": ([(("seed",), 5)], SEED),
    # the neurons' control is a pool of matched neurons, not random draws
    "random_draws": ([(("random_draws",), 3)], LAYER_RULES | (BEYOND - {"neurons"})),
    "layers_per_job": ([(("layers_per_job",), 2)], LAYER_RULES | {"nodes_layer"}),
    "runs.*.model": (
        [(("runs", "tiny-gpt2", "model"), "tiny-llama")],
        CONSUMERS["prepare_model"] - {"fetch_lens"},
    ),
    "runs.*.corpus": (
        [
            (("corpora", "copy"), {"source": "file", "path": COPY}),
            (("runs", "tiny-gpt2", "corpus"), "copy"),
        ],
        CORPUS,
    ),
    "runs.*.lens.source": (
        [(("runs", "tiny-llama-pretrained", "lens", "source"), "train")],
        {"train_lens", "lens_quality"},  # whether a budget is the run's own lens
    ),
    "runs.*.lens.id": ([(("runs", "tiny-llama-pretrained", "lens", "id"), "gpt2")], {"fetch_lens"}),
    "runs.*.lens.allow_other_model": (
        [(("runs", "tiny-llama-pretrained", "lens", "allow_other_model"), True)],
        {"fetch_lens"},
    ),
    # the lens-quality sweep retrains the run's lens at several budgets: it takes the lens
    # settings too
    **{
        f"runs.*.lens.{key}": (
            [(("runs", "tiny-gpt2", "lens", key), value)],
            {"train_lens", "lens_quality"},
        )
        for key, value in (
            ("ridge", 0.01),
            ("refine_steps", 2),
            ("refine_batch_tokens", 32),
            ("refine_tokens", 128),
            ("check_tokens", 64),
            ("lr", 0.001),
        )
    },
    "runs.*.data.seq_len": ([(("runs", "tiny-gpt2", "data"), {"seq_len": 16})], {"tokenize"}),
    **{
        f"runs.*.data.{key}": ([(("runs", "tiny-gpt2", "data"), {key: value})], {"tokenize"})
        for key, value in (("train_sequences", 20), ("eval_sequences", 6), ("seed", 1))
    },
    "runs.*.reference.h0": ([(("runs", "tiny-gpt2", "reference"), {"h0": "H0.1"})], {"h0_table"}),
    "runs.*.reference.h1": ([(("runs", "tiny-gpt2", "reference"), {"h1": "H1.1"})], {"h1_table"}),
    "runs.*.reference.neurons": (
        [(("runs", "tiny-gpt2", "reference"), {"neurons": "stolfo2024-gpt2-small"})],
        {"neurons"},
    ),
    "runs.*.eval_corpora": (
        [(("runs", "tiny-gpt2", "eval_corpora"), ["tiny-code"])],
        {"ood_tokenize"},
    ),
    # a model's whole spec is prepare_model's param: any key of it rebuilds the model
    "models.*.source": ([((*LLAMA, "source"), "hub"), ((*LLAMA, "id"), "gpt2")], MODEL),
    **{
        f"models.*.{key}": ([((*LLAMA, key), value)], MODEL)
        for key, value in (
            ("n_layers", 4),
            ("package", "x==1"),
            ("package_sha256", "0" * 64),
            ("file", "x.gguf"),
            ("sha256", "0" * 64),
            ("id", "gpt2"),
            ("revision", "main"),
            ("arch", "gpt2"),
            ("d_model", 48),
            ("n_heads", 8),
            ("n_kv_heads", 4),
            ("max_positions", 256),
            ("init_std", 0.1),
            ("vocab_size", 300),
            ("seed", 7),
            ("config", {"rope_theta": 500.0}),
            ("norm_std", 0.05),
        )
    },
    # a corpus's whole spec is prepare_corpus's param
    "corpora.*.source": ([((*TEXT, "source"), "hub"), ((*TEXT, "id"), "x")], CORPUS),
    "corpora.*.path": ([((*TEXT, "path"), COPY)], CORPUS),
    **{
        f"corpora.*.{key}": ([((*TEXT, key), value)], CORPUS)
        for key, value in (
            ("package", "x==1"),
            ("sha256", "0" * 64),
            ("member", "x.csv"),
            ("id", "x"),
            ("name", "x"),
            ("split", "train"),
            ("text_column", "body"),
            ("python", "3.11"),
            ("glob", "*.txt"),
            ("format", "verse-lines"),
        )
    },
    "data.seq_len": ([(("data", "seq_len"), 16)], {"tokenize"}),
    **{
        f"data.{key}": ([(("data", key), value)], {"tokenize"})
        for key, value in (("train_sequences", 20), ("eval_sequences", 6), ("seed", 1))
    },
    # the cache's batch sizes are also part of every torch rule's compute param
    "cache.batch_size": ([(("cache", "batch_size"), 4)], DEVICE),
    "cache.gpu_batch_size": ([(("cache", "gpu_batch_size"), 16)], DEVICE),
    **{
        f"compute.{key}": ([(("compute", key), value)], DEVICE)
        for key, value in (
            ("chunk_sequences", 2),
            ("gpu_chunk_sequences", 8),
            ("allow_tf32", True),
            ("fused_cpu", False),
            ("onednn_cpu", False),
        )
    },
    "cache.storage": ([(("cache", "storage"), "float32")], AFTER_CACHE),
    # tiny-llama takes every lens_training key from the top level (tiny-gpt2 overrides refine_steps)
    **{
        f"lens_training.{key}": (
            [(("lens_training", key), value)],
            {"train_lens", "lens_quality", "readout"},  # readout: the back half's lenses
        )
        for key, value in (
            ("ridge", 0.01),
            ("refine_steps", 2),
            ("refine_batch_tokens", 32),
            ("refine_tokens", 128),
            ("check_tokens", 64),
            ("lr", 0.001),
        )
    },
    # layers_per_job groups a section's layers into jobs: a new layer list is a new job ("0_2")
    **{f"{h}.layers": ([((h, "layers"), [0, 2])], {f"{h}_layer"}) for h in ("h1", "h2")},
    "h0.layers": ([(("h0", "layers"), [0, 2])], {"h0_layer", *H0_READERS}),
    **{
        f"h0.{key}": ([(("h0", key), value)], {"h0_layer", "lens_quality", "ood"})
        for key, value in (
            ("subspaces", ["output", "random"]),
            ("bases", ["unembed"]),
            ("modes", ["zero"]),
            ("sites", ["pre_norm"]),
        )
    },
    **{f"{h}.k": ([((h, "k"), ["half", 8])], {f"{h}_layer"}) for h in ("h1", "h2")},
    "h0.k": ([(("h0", "k"), ["half", 8])], {"h0_layer", "lens_quality", "ood"}),
    **{
        f"h1.{key}": ([(("h1", key), value)], {"h1_layer"})
        for key, value in (
            ("subspaces", ["output", "random"]),
            ("bases", ["unembed"]),
            ("modes", ["zero"]),
        )
    },
    **{
        f"h1.heads.{key}": ([(("h1", "heads", key), value)], {"h1_heads"})
        for key, value in (
            ("induction_sequences", 3),
            ("induction_threshold", 0.5),
        )
    },
    # the node experiment's induction-head test takes the same number of permutations
    "h1.heads.n_permutations": ([(("h1", "heads", "n_permutations"), 300)], {"h1_heads", "nodes"}),
    "h1.heads.induction_half_len": ([(("h1", "heads", "induction_half_len"), 6)], {"h1_heads"}),
    **{
        f"h2.{key}": ([(("h2", key), value)], {"h2_layer"})
        for key, value in (
            ("objective", "downstream"),
            ("ridge", 0.01),
            ("refine_steps", 2),
            ("refine_sequences", 2),
            ("lr", 0.001),
            ("subspaces", ["output", "random"]),
            ("modes", ["zero"]),
        )
    },
    "shuffle.pairs": ([(("shuffle", "pairs"), "adjacent")], {"shuffle_pairs", "shuffle_merge"}),
    "shuffle.pairs_per_job": (
        [(("shuffle", "pairs_per_job"), 3)],
        {"shuffle_pairs", "shuffle_merge"},
    ),
    "shuffle.spaces": ([(("shuffle", "spaces"), ["native", "lens"])], SHUFFLE),
    "shuffle.second_ridge": ([(("shuffle", "second_ridge"), 5)], {"ridge_lens", *SHUFFLE}),
    "shuffle.window": ([(("shuffle", "window"), 3)], {"shuffle_windows"}),
    "shuffle.window_samples": ([(("shuffle", "window_samples"), 2)], {"shuffle_windows"}),
    "shuffle.eval_sequences": ([(("shuffle", "eval_sequences"), 4)], SHUFFLE),
    "bootstrap.n_resamples": ([(("bootstrap", "n_resamples"), 150)], N_BOOT),
    "bootstrap.test_resamples": (
        [(("bootstrap", "test_resamples"), 500)],
        {"robustness_table", *BEYOND},
    ),
    "runs.*.readouts": (
        [(("runs", "tiny-gpt2", "readouts"), ["all-tokens"])],
        {"readouts_residuals", "readout"},
    ),
    # one definition's edit reruns that readout alone
    "readouts.define.*.kind": (
        [(("readouts", "define", "all-tokens"), {"kind": "probe", "target": "corpus"})],
        {"readout"},
    ),
    "readouts.define.*.tokens": (
        [(("readouts", "define", "python", "tokens"), "digits")],
        {"readout"},
    ),
    "readouts.define.*.target": (
        [(("readouts", "define", "next-python"), {"kind": "probe", "target": "corpus"})],
        {"readout"},
    ),
    # a back half is read on the run's own corpus only: its layer changes no eval-corpus residual
    "readouts.define.*.layer": ([(("readouts", "define", "back-half", "layer"), 1)], {"readout"}),
    "readouts.define.*.layers": ([(("readouts", "define", "python", "layers"), [1])], {"readout"}),
    "readouts.layers": ([(("readouts", "layers"), [0, 2])], {"readouts_residuals", "readout"}),
    "readouts.modes": ([(("readouts", "modes"), ["zero"])], {"readout"}),
    **{
        f"readouts.probe.{key}": ([(("readouts", "probe", key), value)], {"readout"})
        for key, value in (("l2", 0.01), ("iterations", 50))
    },
    "readouts.back_half.jacobian_sequences": (
        [(("readouts", "back_half", "jacobian_sequences"), 2)],
        {"readout"},
    ),
    **{
        f"ood.{key}": ([(("ood", key), value)], {"ood_tokenize", "ood"})
        for key, value in (
            ("eval_sequences", 4),
            ("mean_sequences", 2),
            ("layers", [0, 2]),
            ("modes", ["zero"]),
            ("overlap_ngram", 12),
        )
    },
    **{
        f"lens_quality.{key}": ([(("lens_quality", key), value)], {"lens_quality"})
        for key, value in (
            ("fractions", [1.0]),
            ("refine", [False]),
            ("layers", [0, 2]),
            ("modes", ["zero"]),
        )
    },
    **{
        f"neurons.{key}": ([(("neurons", key), value)], {"neurons"})
        for key, value in (
            ("n_candidates", 1),
            ("n_largest", 1),
            ("n_matched", 20),
            ("null_share", 0.2),
            ("null_ratio", 5),
            ("min_mediated_share", 0.6),
            ("eval_sequences", 6),
            ("mean_sequences", 6),
        )
    },
    **{
        f"nodes.{key}": ([(("nodes", key), value)], {"nodes_layer"})
        for key, value in (
            ("layers", [0, 2]),
            ("eval_sequences", 3),
            ("fit_sequences", 6),
            ("ridge_sequences", 3),
            ("ridges", [0.01, 1.0]),
            ("jacobian_sequences", 1),
            ("jacobian_positions", 8),
            ("jacobian_patterns", 2),
            ("kl_stride", 3),
        )
    },
    "nodes.min_r2_gain": ([(("nodes", "min_r2_gain"), 0.05)], {"nodes"}),
    "runs.*.circuit_tasks": (
        [(("runs", "tiny-gpt2", "circuit_tasks"), ["induction"])],
        {"circuit_labels", *CIRCUIT_JOBS},
    ),
    **{
        f"circuit_search.{key}": ([(("circuit_search", key), value)], CIRCUIT_JOBS)
        for key, value in (("n_prompts", 6), ("induction_half_len", 5))
    },
    **{
        f"circuit_search.{key}": (
            [(("circuit_search", key), value)],
            {"circuit_full", "circuit_fraction"},
        )
        for key, value in (("ig_steps", 3), ("budgets", [0.05, 0.5]))
    },
    "circuit_search.fractions": ([(("circuit_search", "fractions"), [0.25])], {"circuit_fraction"}),
    "circuit_search.random_draws": (
        [(("circuit_search", "random_draws"), 1)],
        {"circuit_fraction"},
    ),
}


def schema_keys(node: dict, prefix: str = "") -> list[str]:
    """Every leaf key of the schema; a mapping of named entries (runs, models, corpora) as ``*``."""
    properties = node.get("properties")
    if properties is None and isinstance(node.get("additionalProperties"), dict):
        return schema_keys(node["additionalProperties"], prefix + "*.")
    if properties is None:
        return [prefix.rstrip(".")]
    return [key for name, sub in properties.items() for key in schema_keys(sub, f"{prefix}{name}.")]


def test_every_schema_key_has_an_edit():
    schema = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
    keys = schema_keys(schema)
    missing = sorted(set(keys) - set(EDITS))
    assert not missing, f"schema keys without a row in EDITS (add the rules they feed): {missing}"
    assert not sorted(set(EDITS) - set(keys)), "EDITS rows for keys the schema no longer has"


def planned_rules(output: str) -> set[str]:
    """The rule names of a dry run's job-stats table (empty when nothing is to be done)."""
    lines = output.splitlines()
    if "Job stats:" not in lines:
        assert "Nothing to be done" in output, output[-3000:]
        return set()
    rows = lines[lines.index("Job stats:") + 3 :]
    names = []
    for row in rows:
        name = row.split()[0] if row.split() else "total"
        if name == "total":
            break
        names.append(name)
    return set(names) - {"all"}


def _edited(config: dict, edits) -> dict:
    config = copy.deepcopy(config)
    for path, value in edits:
        node = config
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return config


def test_each_config_edit_replans_exactly_the_rules_it_feeds(tiny_run):
    workdir, config = tiny_run
    assert (
        planned_rules(snakemake(workdir, "--configfile", str(workdir / "study.yaml"), "-n").stdout)
        == set()
    )
    (workdir / COPY).write_text(Path(config["corpora"]["tiny-text"]["path"]).read_text())

    def dry_run(item):
        key, (edits, fed) = item
        path = workdir / f"edit_{key.replace('*', 'x')}.yaml"
        path.write_text(yaml.safe_dump(_edited(config, edits)))
        done = snakemake(workdir, "--configfile", str(path), "-n", "--nolock", timeout=600)
        assert done.returncode == 0, f"{key}: {done.stderr[-2000:]}"
        want = planned_by(fed)
        no_ood = {
            ("runs", "tiny-gpt2"),
            ("runs", "tiny-llama-pretrained"),
        }  # runs without eval corpora
        if key != "runs.*.eval_corpora" and any(path[:2] in no_ood for path, _ in edits):
            want -= OOD_RULES  # their edits plan no OOD job
        if key != "runs.*.readouts" and any(path[:2] in no_ood for path, _ in edits):
            want -= READOUT_RULES  # nor a readout (the same runs have none)
        if key != "runs.*.circuit_tasks" and any(path[:2] in no_ood for path, _ in edits):
            want -= CIRCUIT_RULES  # nor a circuit search (the same runs have no tasks)
        return key, planned_rules(done.stdout), want

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(dry_run, EDITS.items()))
    wrong = {
        key: {"planned but not fed": sorted(got - want), "fed but not planned": sorted(want - got)}
        for key, got, want in results
        if got != want
    }
    assert not wrong, wrong


def _tsvs(folder: Path) -> dict[str, bytes]:
    """Every TSV's bytes, but for the measured wall times the circuit search records (the one
    thing a rerun cannot reproduce), whose columns are left out."""
    tables = {}
    for path in sorted(folder.rglob("*.tsv")):
        data = path.read_bytes()
        header = data.split(b"\n", 1)[0].split(b"\t")
        if any(column.decode() in TIMED_COLUMNS for column in header):
            frame = pd.read_csv(path, sep="\t")
            data = frame.drop(columns=[c for c in TIMED_COLUMNS if c in frame]).to_csv().encode()
        tables[str(path.relative_to(folder))] = data
    return tables


def test_sigkill_mid_run_then_unlock_and_rerun_matches_a_clean_run(tiny_run, tmp_path):
    clean_dir, clean_config = tiny_run
    config = copy.deepcopy(clean_config)
    config["runs"] = {"tiny-llama": config["runs"]["tiny-llama"]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--cores",
        "2",
        "--configfile",
        str(tmp_path / "study.yaml"),
    ]
    run = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    # kill the whole process group (Snakemake and its jobs) while a heavy job is writing
    while not list((tmp_path / "results" / "tiny-llama").glob("h0/layers/*.tsv")):
        assert run.poll() is None and time.monotonic() < deadline, (
            "the run ended before it could be killed"
        )
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()

    locked = snakemake(tmp_path, "--configfile", str(tmp_path / "study.yaml"))
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    assert (
        snakemake(tmp_path, "--configfile", str(tmp_path / "study.yaml"), "--unlock").returncode
        == 0
    )
    rerun = snakemake(tmp_path, "--configfile", str(tmp_path / "study.yaml"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    ours = _tsvs(tmp_path / "results" / "tiny-llama")
    clean = _tsvs(clean_dir / "results" / "tiny-llama")
    assert ours.keys() == clean.keys() and len(ours) > 20
    assert [name for name in ours if ours[name] != clean[name]] == []
