"""Config validation: the schema names the bad key and the allowed values; references resolve."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from lensspace.errors import LensspaceError
from lensspace.settings import (
    ablation_grid,
    compute_settings,
    embedding_lens_settings,
    experiment_layers,
    job_layers,
    layer_jobs,
    lens_training,
    shuffle_pair_chunks,
    token_split,
)
from lensspace.validation import check_references

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = str(ROOT / "schemas" / "config.schema.yaml")


def _load(name):
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize(
    "name",
    [
        "config.yaml",
        "configs/paper-gpt2.yaml",
        "configs/tiny.yaml",
        "configs/paper-scale-random.yaml",
        "configs/pythia-160m.yaml",
        "configs/qwen2.5-0.5b.yaml",
    ],
)
def test_shipped_configs_are_valid(name):
    config = _load(name)
    validate(config, SCHEMA)
    check_references(config)
    for run in config["runs"]:
        token_split(config, run)
        if config["runs"][run]["lens"]["source"] == "train":
            lens_training(config, run)
    for section in ("h0", "h1", "h2"):
        assert ablation_grid(config, section).variants(64)
    embedding_lens_settings(config)
    compute = compute_settings(config)
    # the CPU sizes are the ones the study always used; a GPU takes larger batches
    assert (compute.chunk("cpu"), compute.cache_batch("cpu")) == (4, config["cache"]["batch_size"])
    assert compute.chunk("cuda") > 4 and compute.cache_batch("cuda") >= compute.cache_batch("cpu")
    assert not compute.allow_tf32
    n_layers = next(iter(config["models"].values()))["n_layers"]
    pairs = [pair for chunk in shuffle_pair_chunks(config, n_layers) for pair in chunk]
    assert all(0 <= i < j < n_layers for i, j in pairs) and len(set(pairs)) == len(pairs)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c["runs"]["smollm2-bible"]["lens"].update(source="trian"),
            r"'trian' is not one of \['train', 'pretrained'\]",
        ),
        (
            lambda c: c["h0"].update(modes=["zero", "mena"]),
            r"'mena' is not one of \['zero', 'mean'\]",
        ),
        (lambda c: c.update(lenz=1), r"'lenz' was unexpected"),
        (
            lambda c: c["runs"]["smollm2-bible"]["lens"].update(source="pretrained"),
            r"'id' is a required property",
        ),
        (lambda c: c["data"].update(seq_len=1), r"1 is less than the minimum of 2"),
    ],
)
def test_bad_values_name_the_key(mutate, message):
    config = _load("config.yaml")
    mutate(config)
    with pytest.raises(Exception, match=message):
        validate(config, SCHEMA)


def test_defaults_are_filled():
    config = copy.deepcopy(_load("configs/tiny.yaml"))
    del config["bootstrap"], config["h0"]
    validate(config, SCHEMA)
    assert config["bootstrap"]["n_resamples"] == 1000
    assert config["h0"]["layers"] == "all"
    assert config["h0"]["modes"] == ["zero", "mean"]


def test_unknown_model_reference_is_named():
    config = _load("config.yaml")
    config["runs"]["smollm2-bible"]["model"] = "smollm3"
    with pytest.raises(
        LensspaceError, match=r"runs.smollm2-bible.model: 'smollm3' is not defined under models"
    ):
        check_references(config)


def test_shuffle_pairs():
    config = {"shuffle": {"pairs": "all", "pairs_per_job": 4}}
    chunks = shuffle_pair_chunks(config, 5)
    assert [len(c) for c in chunks] == [4, 4, 2]
    config["shuffle"]["pairs"] = "adjacent"
    assert shuffle_pair_chunks(config, 5) == [[(0, 1), (1, 2), (2, 3), (3, 4)]]
    config["shuffle"]["pairs"] = (
        "disjoint"  # every block swapped exactly once (odd count: the last not)
    )
    assert shuffle_pair_chunks(config, 5) == [[(0, 1), (2, 3)]]
    assert sorted(
        b for chunk in shuffle_pair_chunks(config, 30) for pair in chunk for b in pair
    ) == list(range(30))


def test_h0_layer_selection():
    config = {"h0": {"layers": {"stride": 4}}}
    assert experiment_layers(config, 10) == [0, 4, 8, 9]
    assert experiment_layers({"h0": {"layers": "all"}}, 3) == [0, 1, 2]
    assert experiment_layers({"h0": {"layers": [5, 1, 5]}}, 9) == [1, 5]
    bad = _load("config.yaml")
    bad["h0"]["layers"] = [40]
    with pytest.raises(LensspaceError, match="layer 40 does not exist"):
        check_references(bad)


def test_unknown_random_arch_is_refused_at_parse_time():
    """A random model of a family the adapter lacks stops at the config check, naming the key,
    the supported families and the one file to edit."""
    config = copy.deepcopy(_load("configs/tiny.yaml"))
    config["models"]["tiny-llama"]["arch"] = "mamba"
    validate(config, SCHEMA)
    with pytest.raises(
        LensspaceError, match=r"models\.tiny-llama\.arch: model_type 'mamba'"
    ) as err:
        check_references(config)
    message = str(err.value)
    assert "gemma2" in message and "gpt_neox" in message and "src/lensspace/adapter.py" in message


def test_layer_jobs_cover_every_layer_once_in_order():
    layers = [0, 5, 10, 15, 20, 25, 29]
    assert layer_jobs(layers, 1) == ["0", "5", "10", "15", "20", "25", "29"]  # the per-layer names
    jobs = layer_jobs(layers, 3)
    assert jobs == ["0_5_10", "15_20_25", "29"]
    assert [layer for job in jobs for layer in job_layers(job)] == layers
    assert layer_jobs(layers, 100) == ["0_5_10_15_20_25_29"]


def test_the_circuit_search_overlay_adds_the_tasks_to_the_default_run():
    from snakemake.utils import update_config

    config = _load("config.yaml")
    update_config(config, _load("configs/circuit-search.yaml"))
    validate(config, SCHEMA)
    check_references(config)
    run = config["runs"]["smollm2-bible"]
    assert run["circuit_tasks"] == ["ioi", "induction", "greater_than"]
    assert run["readouts"] and run["eval_corpora"]  # the rest of the run is the default's
    assert config["circuit_search"]["n_prompts"] == 32
