"""Bringing your own model: hub folders of any family, unknown families refused early, and
published lenses with their real quirks (built here as folders that mimic them)."""

import json

import pytest
import torch
from conftest import TINY

from lensspace.adapter import Adapter
from lensspace.errors import LensspaceError
from lensspace.lenses import empty_lens, load_lens, read_lens_config, save_lens
from lensspace.models import MANIFEST, build_random_model, load_model, prepare_model, save_prepared


@pytest.fixture(scope="module")
def pythia():
    model, tokenizer = build_random_model(TINY["gpt_neox"])
    return Adapter(model.requires_grad_(False)), tokenizer


def _lens_folder(adapter, folder, seed=0):
    lens = empty_lens(adapter, "EleutherAI/pythia-160m-deduped")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(torch.randn(t.weight.shape, generator=gen) * 0.05)
            t.bias.copy_(torch.randn(t.bias.shape, generator=gen) * 0.05)
    save_lens(lens, folder)
    return lens


def test_published_config_spelling_is_read(pythia, tmp_path):
    """The hub's pythia lenses were saved by an older tuned-lens: their config spells the hash
    key 'unemebd_hash' and carries base_model_revision; both are kept, and the lens loads."""
    adapter, _ = pythia
    ours = _lens_folder(adapter, tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    published = {
        "base_model_name_or_path": "EleutherAI/pythia-160m-deduped",
        "d_model": config["d_model"],
        "num_hidden_layers": config["num_hidden_layers"],
        "bias": True,
        "base_model_revision": "step143000",
        "unemebd_hash": "7f56aa8e" * 8,
        "lens_type": "linear_tuned_lens",
    }
    (tmp_path / "lens" / "config.json").write_text(json.dumps(published))
    read = read_lens_config(tmp_path / "lens" / "config.json")
    assert read.unembed_hash == "7f56aa8e" * 8
    assert read.base_model_revision == "step143000"
    loaded = load_lens(adapter, tmp_path / "lens")
    for a, b in zip(ours.layer_translators, loaded.layer_translators):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    # saved again as the run's lens: tuned-lens's spelling, this model's hash, the revision kept
    save_lens(loaded, tmp_path / "run-lens")
    again = json.loads((tmp_path / "run-lens" / "config.json").read_text())
    assert (
        "unemebd_hash" not in again and again["unembed_hash"] == loaded.unembed.unembedding_hash()
    )
    assert again["base_model_revision"] == "step143000"


def test_both_spellings_prefer_the_correct_one(pythia, tmp_path):
    adapter, _ = pythia
    _lens_folder(adapter, tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    config.update(unemebd_hash="old", unembed_hash="new")
    (tmp_path / "lens" / "config.json").write_text(json.dumps(config))
    assert read_lens_config(tmp_path / "lens" / "config.json").unembed_hash == "new"


def test_lens_for_another_layer_count_is_refused_with_both_counts(pythia, tmp_path):
    adapter, _ = pythia
    _lens_folder(adapter, tmp_path / "lens")
    path = tmp_path / "lens" / "config.json"
    config = json.loads(path.read_text())
    config["num_hidden_layers"] = 12
    path.write_text(json.dumps(config))
    with pytest.raises(LensspaceError, match=r"has 12 layers .* but the model has 3 layers"):
        load_lens(adapter, tmp_path / "lens")


def test_params_with_another_translator_count_are_refused(pythia, tmp_path):
    """A params.pt that disagrees with its own config (and the model) names both counts."""
    adapter, _ = pythia
    _lens_folder(adapter, tmp_path / "lens")
    params = tmp_path / "lens" / "params.pt"
    state = torch.load(params, weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("2.")}
    torch.save(state, params)
    with pytest.raises(LensspaceError, match=r"holds 2 translators but the model has 3 layers"):
        load_lens(adapter, tmp_path / "lens")


def test_hub_model_of_any_family_prepares_from_a_local_folder(tmp_path):
    """The hub path (AutoConfig, then the family check, then weights) on a saved tiny Qwen2
    folder, which from_pretrained reads like a hub id."""
    model, tokenizer = build_random_model(TINY["qwen2"])
    save_prepared(model, tokenizer, tmp_path / "hub")
    manifest = prepare_model(
        "q",
        {"source": "hub", "id": str(tmp_path / "hub"), "n_layers": 3},
        tmp_path / "out",
        tmp_path / "dl",
    )
    assert manifest["model_type"] == "qwen2" and (tmp_path / "out" / MANIFEST).exists()
    again, _ = load_model(tmp_path / "out")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_hub_model_of_unknown_family_is_refused_before_weights(tmp_path):
    """A config of a family without an adapter entry stops prepare_model right after the config
    is read: the folder has no weights at all, so reaching them would fail differently."""
    from transformers import AutoConfig

    AutoConfig.for_model(
        "mamba", hidden_size=16, num_hidden_layers=2, vocab_size=300
    ).save_pretrained(tmp_path / "hub")
    with pytest.raises(
        LensspaceError,
        match=r"model 'm' \(hub id .*\): model_type 'mamba' has no "
        r"architecture adapter; supported: .*gpt_neox.*src/lensspace/adapter.py",
    ):
        prepare_model(
            "m",
            {"source": "hub", "id": str(tmp_path / "hub"), "n_layers": 2},
            tmp_path / "out",
            tmp_path / "dl",
        )
    assert not (tmp_path / "out").exists()
