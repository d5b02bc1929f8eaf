"""Every bad input is refused before work with one clear line naming the key or file and the fix:
schema errors, duplicate YAML keys, folder-name keys, pip options, settings that do not fit the
model, a lens made for another model, a damaged activation cache, a corrupt params.pt."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import ROOT, make_cached, snakemake
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache, layer_file
from lensspace.adapter import Adapter
from lensspace.configfile import check_duplicate_keys, validate_config
from lensspace.errors import LensspaceError
from lensspace.lenses import check_lens_origin, empty_lens, load_lens, save_lens
from lensspace.models import build_random_model, prepare_model
from lensspace.sources import pip_download
from lensspace.validation import check_config, manifest_facts, model_checks, random_model_facts

SCHEMA = ROOT / "schemas" / "config.schema.yaml"


def _tiny() -> dict:
    return yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def _default() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c["h0"].update(sites=["pre_norm", "postnorm"]),
            "h0.sites[1]: 'postnorm' is not one of ['pre_norm', 'post_norm']",
        ),
        (
            lambda c: c.update(lenz=1),
            "the config: unknown key 'lenz'; allowed keys: bootstrap, cache, circuit_search, "
            "compute, corpora, data, device, h0, h1, h2, layers_per_job, lens_quality, "
            "lens_training, models, neurons, nodes, ood, random_draws, readouts, runs, seed, "
            "shuffle",
        ),
        (
            lambda c: c["h0"].update(layers="al"),
            "h0.layers: 'al' is not allowed; use 'all' or a list, each an integer >= 0 or a "
            "mapping of stride",
        ),
        (
            lambda c: c["h1"].update(k=["half", "thrid"]),
            "h1.k[1]: 'thrid' is not allowed; use an integer >= 1 or one of 'half', 'quarter'",
        ),
        (
            lambda c: c["runs"]["smollm2-bible"]["lens"].update(source="pretrained"),
            "runs.smollm2-bible.lens: 'id' is a required property",
        ),
        (
            lambda c: c["data"].update(seq_len="long"),
            "data.seq_len: 'long' is not of type 'integer'",
        ),
        (
            lambda c: c["models"].update({"../../x": c["models"]["smollm2-135m"]}),
            "models: the name '../../x' is not allowed; names start with a letter or digit",
        ),
        (
            lambda c: c["corpora"].update({"a;b": c["corpora"]["web-bible"]}),
            "corpora: the name 'a;b' is not allowed",
        ),
        (
            lambda c: c["lens_training"].update(lr=float("nan")),
            "lens_training.lr: nan is not a finite number; numeric settings must be finite",
        ),
        (
            lambda c: c["lens_quality"].update(fractions=[0.5, float("inf")]),
            "lens_quality.fractions[1]: inf is not a finite number",
        ),
        (
            lambda c: c["neurons"].update(min_mediated_share=float("-inf")),
            "neurons.min_mediated_share: -inf is not a finite number",
        ),
        (
            lambda c: c["models"]["smollm2-135m"].update(package="--index-url=http://x==1"),
            "models.smollm2-135m.package: '--index-url=http://x==1' is not allowed; pypi-gguf: "
            "an exact requirement",
        ),
    ],
)
def test_schema_error_is_one_line_with_key_value_and_allowed(mutate, message):
    config = _default()
    mutate(config)
    with pytest.raises(LensspaceError) as err:
        validate_config(config, SCHEMA)
    assert message in str(err.value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_validation_fills_the_defaults_like_snakemake():
    config = _tiny()
    del config["bootstrap"], config["h0"]
    validate_config(config, SCHEMA)
    assert config["bootstrap"] == {"n_resamples": 1000, "test_resamples": 20000}
    assert config["h0"]["layers"] == "all" and config["h0"]["modes"] == ["zero", "mean"]
    assert config["runs"]["tiny-llama"]["lens"]["allow_other_model"] is False


def test_duplicate_keys_are_named_with_both_lines(tmp_path):
    text = (ROOT / "configs" / "tiny.yaml").read_text()
    lines = text.splitlines()
    seed = lines.index("seed: 0") + 1  # 1-based line numbers, found independently of the checker
    doubled = text.replace("seed: 0\n", "seed: 0\nseed: 3\n", 1)
    (tmp_path / "two_seeds.yaml").write_text(doubled)
    with pytest.raises(
        LensspaceError,
        match=rf"key 'seed' appears twice in the top level, on lines {seed} and {seed + 1}",
    ):
        check_duplicate_keys(tmp_path / "two_seeds.yaml")
    first, second = lines.index("  tiny-llama:") + 1, lines.index("  tiny-gpt2:") + 1
    runs = text.replace("  tiny-gpt2:\n", "  tiny-llama:\n", 1)
    (tmp_path / "two_runs.yaml").write_text(runs)
    with pytest.raises(
        LensspaceError,
        match=rf"key 'tiny-llama' appears twice in runs, on lines {first} and {second}",
    ):
        check_duplicate_keys(tmp_path / "two_runs.yaml")
    check_duplicate_keys(ROOT / "configs" / "tiny.yaml")


def test_pip_option_is_never_passed_to_pip(tmp_path):
    with pytest.raises(LensspaceError, match="starts with '-', which pip reads as an option"):
        pip_download("--index-url=http://example.invalid/", tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c["h0"].update(k=["half", 40]),
            "h0.k: 40 is larger than d_model 32 of model 'tiny-llama' of run "
            "'tiny-llama'; use at most 32",
        ),
        (lambda c: c["h2"].update(k=[33]), "h2.k: 33 is larger than d_model 32"),
        (
            lambda c: c["models"]["tiny-gpt2"].update(n_heads=5),
            "models.tiny-gpt2.n_heads: 5 heads do not divide d_model 32",
        ),
        (
            lambda c: c["models"]["tiny-llama"].update(n_kv_heads=3),
            "models.tiny-llama.n_kv_heads: 3 key/value heads do not divide n_heads 4",
        ),
        (
            lambda c: c["data"].update(seq_len=600),
            "data.seq_len: 600 is longer than the context of model 'tiny-llama' of "
            "run 'tiny-llama' (512 positions); use at most 512",
        ),
        (
            lambda c: (
                c["runs"]["tiny-gpt2"].update(data={"seq_len": 100})
                or c["models"]["tiny-gpt2"].update(max_positions=64)
            ),
            "runs.tiny-gpt2.data.seq_len: 100 is longer than the context of model 'tiny-gpt2'",
        ),
        (
            lambda c: c["h1"]["heads"].update(induction_half_len=300),
            "h1.heads.induction_half_len: 300 makes induction sequences of 600 tokens",
        ),
        (
            lambda c: c["shuffle"].update(window=4),
            "shuffle.window: 4 is more blocks than model 'tiny-llama'",
        ),
    ],
)
def test_random_model_settings_are_checked_from_the_config(mutate, message):
    config = _tiny()
    validate_config(config, SCHEMA)
    mutate(config)
    with pytest.raises(LensspaceError) as err:
        check_config(config, lambda name: random_model_facts(name, config["models"][name]))
    assert message in str(err.value)


def test_prepared_model_records_its_context_and_is_checked(tmp_path):
    spec = {
        "source": "random",
        "arch": "gpt2",
        "n_layers": 2,
        "d_model": 16,
        "n_heads": 2,
        "max_positions": 40,
    }
    manifest = prepare_model("small", spec, tmp_path / "small", tmp_path / "downloads")
    assert manifest["context_length"] == 40
    facts = manifest_facts(tmp_path / "small" / "lensspace-model.json")
    assert facts == {"d_model": 16, "n_layers": 2, "context_length": 40}
    config = _tiny()
    validate_config(config, SCHEMA)
    config["models"]["tiny-llama"] = {
        "source": "pypi-gguf",
        "package": "x==1",
        "file": "x.gguf",
        "sha256": "0" * 64,
        "n_layers": 2,
    }
    with pytest.raises(
        LensspaceError, match="data.seq_len: 32 is longer than the context of model 'tiny-llama'"
    ):
        check_config(
            {**config, "runs": {"tiny-llama": config["runs"]["tiny-llama"]}},
            lambda name: {**facts, "context_length": 20},
        )
    assert model_checks(config, "tiny-llama")["h0.k"] == ["half", 4]


@pytest.mark.workflow
def test_bad_settings_stop_the_workflow_before_any_job_in_a_few_lines(tmp_path):
    config = _tiny()
    config["corpora"]["tiny-text"]["path"] = str(ROOT / "tests" / "data" / "tiny_corpus.txt")
    config["h0"]["k"] = ["half", 40]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "--configfile", str(tmp_path / "bad.yaml"), timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "h0.k: 40 is larger than d_model 32" in out
    assert len(out.strip().splitlines()) <= 4, out
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()

    # YAML's .nan passes every bound of the schema: refused when the config is read
    config["h0"]["k"] = ["half", 4]
    config["lens_training"] = {**config.get("lens_training", {}), "lr": float("nan")}
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(config))
    assert ".nan" in (tmp_path / "nan.yaml").read_text()
    done = snakemake(tmp_path, "--configfile", str(tmp_path / "nan.yaml"), timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "lens_training.lr: nan is not a finite number" in out
    assert len(out.strip().splitlines()) <= 4, out
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()

    duplicated = (
        (tmp_path / "bad.yaml").read_text().replace("\nseed: 0\n", "\nseed: 0\nseed: 1\n", 1)
    )
    (tmp_path / "dup.yaml").write_text(duplicated)
    done = snakemake(tmp_path, "--configfile", str(tmp_path / "dup.yaml"), "-n", timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "key 'seed' appears twice" in out and "dup.yaml" in out
    assert len(out.strip().splitlines()) <= 4, out


@pytest.mark.workflow
def test_real_model_context_is_checked_before_any_job(tmp_path):
    config = _default()
    folder = ROOT / "resources" / "models" / "smollm2-135m"
    if not (folder / "lensspace-model.json").exists():  # as the fixture `real` prepares it
        prepare_model(
            "smollm2-135m",
            config["models"]["smollm2-135m"],
            folder,
            ROOT / "resources" / "downloads" / "smollm2-135m",
        )
    (tmp_path / "resources").symlink_to(ROOT / "resources")
    config["data"]["seq_len"] = 100_000
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "--configfile", str(tmp_path / "long.yaml"), "-n", timeout=300)
    context = json.loads(
        (ROOT / "resources" / "models" / "smollm2-135m" / "config.json").read_text()
    )["max_position_embeddings"]
    assert done.returncode != 0
    assert (
        "data.seq_len: 100000 is longer than the context of model 'smollm2-135m' of run "
        f"'smollm2-bible' ({context} positions)"
    ) in done.stdout + done.stderr


def _same_shape_models():
    spec = {"arch": "llama", "n_layers": 2, "d_model": 16, "n_heads": 2}
    ours, _ = build_random_model({**spec, "seed": 1})
    other, _ = build_random_model({**spec, "seed": 2})
    return Adapter(ours), Adapter(other)


def test_lens_for_another_model_is_refused_unless_allowed(tmp_path):
    ours, other = _same_shape_models()
    TunedLens.from_model(other.model).save(tmp_path / "theirs")
    with pytest.raises(
        LensspaceError,
        match=r"lens .*theirs was trained for another model: unembedding hash .*"
        r"lens.allow_other_model: true",
    ):
        check_lens_origin(ours, tmp_path / "theirs", ["tiny"], allow_other=False)
    assert "differs (allowed" in check_lens_origin(
        ours, tmp_path / "theirs", ["tiny"], allow_other=True
    )
    TunedLens.from_model(ours.model).save(tmp_path / "own")
    assert "matches" in check_lens_origin(ours, tmp_path / "own", ["tiny"], allow_other=False)

    # the misspelled key some published lenses carry counts too; without a hash, the base model name
    config = json.loads((tmp_path / "theirs" / "config.json").read_text())
    config["unemebd_hash"] = config.pop("unembed_hash")
    (tmp_path / "theirs" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensspaceError, match="trained for another model: unembedding hash"):
        check_lens_origin(ours, tmp_path / "theirs", ["tiny"], allow_other=False)
    del config["unemebd_hash"]
    config["base_model_name_or_path"] = "EleutherAI/pythia-70m"
    (tmp_path / "theirs" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensspaceError, match="base model 'EleutherAI/pythia-70m'"):
        check_lens_origin(ours, tmp_path / "theirs", ["tiny", "org/tiny"], allow_other=False)
    assert "matches" in check_lens_origin(
        ours, tmp_path / "theirs", ["pythia-70m"], allow_other=False
    )


def test_lens_of_the_same_shape_is_measurably_wrong(tmp_path):
    """Why the check exists: the other model's lens fits this model's layers worse."""
    from lensspace.lenses import LensTraining, evaluate_lens, train_lens

    ours, other = _same_shape_models()
    lenses = {}
    for name, adapter in (("ours", ours), ("other", other)):
        cached = make_cached(adapter, tmp_path / name, seed=0, n_train=16, n_eval=8, seq_len=16)
        lenses[name] = train_lens(adapter, cached.cache, LensTraining(refine_steps=0), name)
        if name == "ours":
            cache = cached.cache
    save_lens(lenses["other"], tmp_path / "other_lens")
    wrong = load_lens(ours, tmp_path / "other_lens")
    kl = {
        name: evaluate_lens(ours, lens, cache, n_boot=50, seed=0)[0]["kl"]
        for name, lens in (("own", lenses["ours"]), ("other", wrong))
    }
    assert kl["other"] > kl["own"]


@pytest.fixture
def lens_folder(tmp_path):
    adapter, _ = _same_shape_models()
    save_lens(empty_lens(adapter, "tiny"), tmp_path / "lens")
    return adapter, tmp_path / "lens"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "list", "keys"])
def test_corrupt_lens_params_give_one_line_with_the_file_and_the_fix(lens_folder, damage):
    adapter, folder = lens_folder
    params = folder / "params.pt"
    data = params.read_bytes()
    if damage == "truncate":
        params.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        params.write_bytes(b"\x80\x04" + bytes(range(256)) * 4)
    elif damage == "list":
        torch.save([torch.zeros(2)], params)
    else:
        torch.save({"0.weight": torch.zeros(2)}, params)
    with pytest.raises(LensspaceError) as err:
        load_lens(adapter, folder)
    message = str(err.value)
    assert str(params) in message and f"snakemake --forcerun {params}" in message
    assert "weights_only" not in message and "\n" not in message


def test_corrupt_lens_config_is_named(lens_folder):
    adapter, folder = lens_folder
    (folder / "config.json").write_text('{"d_model": ')
    with pytest.raises(
        LensspaceError, match=r"lens file .*config.json is not a readable tuned-lens config"
    ):
        load_lens(adapter, folder)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_damaged_cache_file_is_named_with_the_rebuild_command(tmp_path, damage):
    adapter, _ = _same_shape_models()
    cached = make_cached(adapter, tmp_path / "activations", seed=0, n_train=4, n_eval=2, seq_len=8)
    assert torch.equal(
        ActivationCache(tmp_path / "activations").load(1, "eval"), cached.cache.load(1, "eval")
    )
    target = layer_file(tmp_path / "activations", 1)
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[:-100])
    elif damage == "flip":
        target.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    elif damage == "delete":
        target.unlink()
    else:
        target = tmp_path / "activations" / "meta.json"
        target.write_text(target.read_text()[:50])
    with pytest.raises(LensspaceError) as err:
        ActivationCache(tmp_path / "activations").load(1, "eval")
    message = str(err.value)
    assert str(target) in message and f"snakemake --forcerun {tmp_path / 'activations'}" in message
    if damage == "flip":  # same size: found when read; the other files are still read
        assert torch.equal(
            ActivationCache(tmp_path / "activations").load(0, "eval"), cached.cache.load(0, "eval")
        )
