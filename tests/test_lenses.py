"""Lenses: zero translators are the logit lens; files interoperate with tuned-lens both ways."""

import json

import pytest
import torch
from tuned_lens.nn import LogitLens, TunedLens

from lensspace import lenses
from lensspace.activations import ActivationCache, residuals, write_cache
from lensspace.errors import LensspaceError
from lensspace.lenses import (
    LensTraining,
    empty_lens,
    evaluate_lens,
    fit_affine,
    held_out_sequences,
    load_lens,
    save_lens,
    train_lens,
    translate,
)


def _perturb(lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for translator in lens.layer_translators:
            translator.weight.copy_(torch.randn(translator.weight.shape, generator=gen) * 0.05)
            translator.bias.copy_(torch.randn(translator.bias.shape, generator=gen) * 0.05)
    return lens


# Families whose models tuned-lens 0.2.0's own Unembed handles (its model_surgery knows their
# base-model classes); OPT only with a final norm and no project_out. The others are ours alone.
TUNED_LENS_FAMILIES = {"gpt2", "gpt_neox", "llama", "opt"}


def _tuned_lens_supports(adapter) -> bool:
    return (
        adapter.model_type in TUNED_LENS_FAMILIES
        and adapter.final_norm is not None
        and adapter.head_projection is None
    )


def test_tuned_lens_support_is_as_the_readme_says(tiny):
    """Where tuned-lens's own Unembed refuses a family, ours is the only loader."""
    adapter, _ = tiny
    if _tuned_lens_supports(adapter):
        LogitLens.from_model(adapter.model)
    else:
        with pytest.raises((NotImplementedError, ValueError)):
            LogitLens.from_model(adapter.model)


def test_zero_translator_is_logit_lens(tiny, tiny_ids):
    adapter, _ = tiny
    lens = empty_lens(adapter, "tiny")
    h = torch.randn(2, 6, adapter.d_model)
    logit_lens = LogitLens.from_model(adapter.model) if _tuned_lens_supports(adapter) else None
    for layer in range(adapter.n_layers):
        torch.testing.assert_close(translate(lens, h, layer), h)
        torch.testing.assert_close(lens(h, layer), adapter.logits(h))
        if logit_lens is not None:
            torch.testing.assert_close(
                adapter.logits(translate(lens, h, layer)),
                logit_lens(h, layer),
                atol=1e-5,
                rtol=1e-5,
            )
    # the lens's head on the last residual is the model's own output
    with torch.no_grad():
        final = residuals(adapter, tiny_ids)[-1]
        assert (lens(final, 0) - adapter.model(tiny_ids).logits).abs().max() < 1e-4


def test_saved_lens_loads_in_tuned_lens_with_same_logits(tiny, tmp_path):
    """Ours loads with tuned-lens where it supports the family, and with our loader for all."""
    adapter, _ = tiny
    lens = _perturb(empty_lens(adapter, "tiny"))
    save_lens(lens, tmp_path / "lens")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["config.json", "params.pt"]
    again = load_lens(adapter, tmp_path / "lens")
    for a, b in zip(lens.layer_translators, again.layer_translators):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    theirs = (
        TunedLens.from_model_and_pretrained(adapter.model, str(tmp_path / "lens"))
        if _tuned_lens_supports(adapter)
        else None
    )
    h = torch.randn(3, 5, adapter.d_model)
    for layer in range(adapter.n_layers):
        ours = adapter.logits(translate(lens, h, layer))
        torch.testing.assert_close(again(h, layer), ours)
        if theirs is not None:
            torch.testing.assert_close(theirs(h, layer), ours, atol=1e-5, rtol=1e-5)


def test_tuned_lens_own_save_is_accepted_as_pretrained(tiny, tmp_path):
    adapter, _ = tiny
    if not _tuned_lens_supports(adapter):
        return  # tuned-lens cannot build a lens for this family (test above)
    theirs = _perturb(TunedLens.from_model(adapter.model), seed=1)
    theirs.save(tmp_path / "theirs")
    ours = load_lens(adapter, tmp_path / "theirs")
    for a, b in zip(theirs.layer_translators, ours.layer_translators):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_mismatched_lens_is_refused(tiny, tmp_path):
    adapter, _ = tiny
    save_lens(empty_lens(adapter, "tiny"), tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    config["num_hidden_layers"] = 7
    (tmp_path / "lens" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LensspaceError, match="7 layers"):
        load_lens(adapter, tmp_path / "lens")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LensspaceError, match="config.json and params.pt"):
        load_lens(adapter, tmp_path / "empty")


def test_trained_lens_beats_logit_lens(tiny, tmp_path):
    adapter, _ = tiny
    gen = torch.Generator().manual_seed(1)
    tokens = {
        "train": torch.randint(0, 256, (32, 16), generator=gen, dtype=torch.int32),
        "eval": torch.randint(0, 256, (8, 16), generator=gen, dtype=torch.int32),
    }
    write_cache(adapter, tokens, tmp_path / "cache", {"tokens_sha256": "x"})
    cache = ActivationCache(tmp_path / "cache", tokens_sha256="x")
    lens = train_lens(
        adapter,
        cache,
        LensTraining(refine_steps=5, refine_batch_tokens=32, refine_tokens=128),
        "tiny",
    )
    rows = evaluate_lens(adapter, lens, cache, n_boot=50, seed=0)
    by = {(r["layer"], r["lens"]): r["kl"] for r in rows}
    for layer in range(adapter.n_layers):
        assert 0 <= by[(layer, "tuned")] < by[(layer, "logit")]
    assert {r["n_tokens"] for r in rows} == {8 * 15}


def test_held_out_sequences_are_a_block_of_about_check_tokens():
    settings = LensTraining(check_tokens=512)
    assert held_out_sequences(64, 128, settings) == range(60, 64)  # 4 x 127 evaluated tokens
    assert held_out_sequences(64, 128, LensTraining(check_tokens=1)) == range(63, 64)
    assert held_out_sequences(8, 128, LensTraining(check_tokens=10**6)) == range(6, 8)  # a quarter
    assert held_out_sequences(3, 128, settings) == range(2, 3)
    assert len(held_out_sequences(64, 128, LensTraining(refine_steps=0))) == 0
    assert len(held_out_sequences(64, 128, LensTraining(check_tokens=0))) == 0
    assert len(held_out_sequences(1, 128, settings)) == 0


def test_refinement_check_uses_sequences_the_fit_did_not_see(tiny, tmp_path, monkeypatch):
    """With a zero learning rate the refinement changes nothing and is reverted, so each
    translator is the least-squares fit: on the sequences outside the held-out block only.
    The keep-or-revert check sees exactly the held-out block."""
    adapter, _ = tiny
    gen = torch.Generator().manual_seed(2)
    tokens = {
        "train": torch.randint(0, 256, (12, 16), generator=gen, dtype=torch.int32),
        "eval": torch.randint(0, 256, (2, 16), generator=gen, dtype=torch.int32),
    }
    write_cache(adapter, tokens, tmp_path / "cache", {}, storage="float32")
    cache = ActivationCache(tmp_path / "cache")
    settings = LensTraining(
        refine_steps=2, refine_batch_tokens=16, refine_tokens=64, check_tokens=45, lr=0.0
    )
    check = held_out_sequences(12, 16, settings)
    assert check == range(9, 12)
    seen, original_kl = [], lenses._kl

    def recording_kl(adapter, translator, h, target, target_p):
        seen.append(h)
        assert torch.equal(target_p, target.exp())
        return original_kl(adapter, translator, h, target, target_p)

    monkeypatch.setattr(lenses, "_kl", recording_kl)
    lens = train_lens(adapter, cache, settings, "tiny")
    final = cache.final("train")

    def positions(x):
        return x[:, 1:].reshape(-1, x.shape[-1])

    for layer in range(adapter.n_layers):
        h = cache.load(layer, "train")
        weight, bias = fit_affine(positions(h[:9]), positions(final[:9]), settings.ridge)
        translator = lens.layer_translators[layer]
        assert torch.equal(translator.weight, weight) and torch.equal(translator.bias, bias)
        on_all, _ = fit_affine(positions(h), positions(final), settings.ridge)
        assert not torch.allclose(translator.weight, on_all, atol=1e-4)
        assert torch.equal(seen[2 * layer], positions(h[9:]))  # before the refinement
        assert torch.equal(seen[2 * layer + 1], positions(h[9:]))  # after it
