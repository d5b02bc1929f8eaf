"""H2 on the real default model (SmolLM2-135M), where position 0 is an attention sink whose
residual is hundreds to tens of thousands of times the embedding's norm, and W_E is tied to W_U."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import TINY, head_logp64, normalize64

from lensspace.adapter import Adapter
from lensspace.divergences import kl_from_logprobs
from lensspace.experiments import h2
from lensspace.experiments.grid import AblationGrid, subspace_basis
from lensspace.experiments.h2 import (
    EmbeddingLensSettings,
    embedding_basis,
    embeddings_tied,
    evaluate_layers,
    fit_embedding_lenses,
    mapped_residual,
    route_logits,
)
from lensspace.models import build_random_model
from lensspace.runner import BlockRunner, hooked
from lensspace.subspaces import ablate, unembedding_bases

GRID = AblationGrid(
    subspaces=("output",),
    ks=(8,),
    bases=("embed",),
    modes=("zero",),
    sites=("embedding",),
    n_boot=20,
)


def _kl(target_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(target || logits) over positions 1.. of every sequence."""
    return float(
        kl_from_logprobs(target_logits[:, 1:].log_softmax(-1), logits[:, 1:].log_softmax(-1)).mean()
    )


@pytest.mark.parametrize("layer", [6, 12])
def test_exact_map_runs_downstream_to_the_models_own_output(real, layer):
    """With E_i replaced by the exact map (the mapped residual equals the cached h_i everywhere),
    the downstream route reproduces the model's final output: KL about 0. Putting the layer-0
    embedding at position 0 instead costs over a nat at these layers."""
    runner = BlockRunner(real.adapter)
    e, h = real.cache.load(0, "eval")[:3], real.cache.load(layer, "eval")[:3]
    target = real.adapter.logits(real.cache.final("eval")[:3])
    mapped = mapped_residual(lambda _: h[:, 1:], e, h)
    torch.testing.assert_close(mapped, h, rtol=0, atol=0)
    logits = route_logits(runner, real.lens, layer, mapped, "downstream")
    assert _kl(target, logits) < 0.02
    embedding_at_zero = torch.cat([e[:, :1], h[:, 1:]], dim=1)
    assert (
        _kl(target, route_logits(runner, real.lens, layer, embedding_at_zero, "downstream")) > 0.5
    )


def test_fit_and_evaluation_run_blocks_from_the_cached_residual_at_position_zero(real, monkeypatch):
    """Both the downstream refinement and the evaluation build their block input with
    ``mapped_residual``, and it carries h_i[:, 0] (the sink), not the embedding, at position 0."""
    layer, runner = 6, BlockRunner(real.adapter)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(emb_lens, e, h):
        out = mapped_residual(emb_lens, e, h)
        calls.append((out.detach(), h))
        return out

    monkeypatch.setattr(h2, "mapped_residual", spy)
    emb = fit_embedding_lenses(
        runner,
        real.lens,
        real.cache,
        [layer],
        EmbeddingLensSettings(objective="downstream", refine_steps=1, refine_sequences=2),
    )[layer]
    train = real.cache.load(layer, "train")
    assert len(calls) == 1
    out, h = calls[0]
    assert len(h) == 2 and all(any(torch.equal(row, seq) for seq in train) for row in h)
    evaluate_layers(
        runner, real.lens, real.cache, {layer: emb}, embedding_basis(real.adapter), GRID
    )
    assert len(calls) == 2
    out, h = calls[1]
    torch.testing.assert_close(h, real.cache.load(layer, "eval"), rtol=0, atol=0)
    for out, h in calls:
        torch.testing.assert_close(out[:, 0], h[:, 0], rtol=0, atol=0)
        assert (
            out[:, 0].norm(dim=-1).min() > 100 * real.cache.load(0, "eval")[:, 0].norm(dim=-1).max()
        )


def test_downstream_route_kl_equals_the_models_own_forward_with_the_map_patched_in(real):
    """Independent recomputation: the model's own forward pass with positions 1.. of the
    residual entering block i replaced by E_i(e) (position 0 computed by the model itself)
    gives the downstream-route KL of ``evaluate_layers``."""
    adapter, layer = real.adapter, 6
    runner = BlockRunner(adapter)
    emb = fit_embedding_lenses(
        runner, real.lens, real.cache, [layer], EmbeddingLensSettings(refine_steps=0)
    )[layer]
    fit, _ = evaluate_layers(
        runner, real.lens, real.cache, {layer: emb}, embedding_basis(adapter), GRID
    )[layer]
    ids = real.tokens["eval"].long()
    with torch.no_grad():
        e = adapter.embed_tokens(ids)
        clean = adapter.model(ids).logits
        with hooked(adapter, layer, lambda x: torch.cat([x[:, :1], emb(e[:, 1:])], dim=1)):
            patched = adapter.model(ids).logits
    assert fit["kl_downstream_route"] == pytest.approx(_kl(clean, patched), rel=0.02)


# the halves and k = 100 (halves whose complements are not in the grid), both modes
CELLS = AblationGrid(
    subspaces=("output", "internal", "random"),
    ks=("half", 100),
    bases=("embed",),
    modes=("zero", "mean"),
    sites=("embedding",),
    random_draws=2,
    n_boot=20,
    experiment="h2",
)


def test_embedding_cells_and_lens_route_equal_the_float64_definition(real):
    """``evaluate_layers`` at two layers of one job (the removed coefficients carried into lens
    space through M = (I + A_i)(I + B_i), each KL from the head's linearity; the lens route's KL
    from the same clean logits) against the definitions in float64: ablate e, apply E_i and T_i,
    then norm, gain and unembedding, then log-softmax; every cell, sequence and token. The real
    lens biases and translators are large here, and the mean ablation's constant part too."""
    adapter, runner = real.adapter, BlockRunner(real.adapter)
    layers = [6, 24]
    emb_lenses = fit_embedding_lenses(
        runner,
        real.lens,
        real.cache,
        layers,
        EmbeddingLensSettings(refine_steps=1, refine_sequences=2),
    )
    basis = embedding_basis(adapter)
    evaluated = evaluate_layers(runner, real.lens, real.cache, emb_lenses, basis, CELLS)
    e = real.cache.load(0, "eval")[:, 1:].double()
    mean = real.cache.load(0, "train")[:, 1:].mean((0, 1)).double()
    target = head_logp64(adapter, normalize64(adapter, real.cache.final("eval")[:, 1:].double()))
    for layer, emb in emb_lenses.items():
        fit, results = evaluated[layer]
        translator = real.lens.layer_translators[layer]

        def lens_logp(x: torch.Tensor) -> torch.Tensor:  # log p of T_i(E_i(x)), all in float64
            y = x + x @ emb.linear.weight.double().T + emb.linear.bias.double()
            z = y + y @ translator.weight.double().T + translator.bias.double()
            return head_logp64(adapter, normalize64(adapter, z))

        clean = lens_logp(e)
        route = kl_from_logprobs(target, clean)
        assert fit["kl_lens_route"] == pytest.approx(float(route.mean()), rel=1e-4)
        for cell in CELLS.variants(adapter.d_model):
            q = subspace_basis(
                {"embed": basis}, CELLS, layer, cell.subspace, cell.k, cell.basis, cell.draw
            )
            expected = kl_from_logprobs(clean, lens_logp(ablate(e, q.double(), cell.mode, mean)))
            got = torch.cat(results.kl[cell])
            assert got.min() >= 0
            torch.testing.assert_close(got.mean(-1), expected.mean(-1), rtol=2e-5, atol=1e-7)
            torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-6)


def test_tied_embeddings_are_detected_by_value(real):
    """SmolLM2 and the tiny families that tie W_E and W_U are reported tied (H2's embedding basis
    is then H0's unembedding basis, direction for direction, Gemma's sqrt(d) scale included); an
    untied copy is reported as untied, and so are Pythia's untied matrices and OPT-350m, whose
    tied matrices sit behind project_in / project_out."""
    assert embeddings_tied(real.adapter)
    torch.testing.assert_close(
        embedding_basis(real.adapter).vectors,
        unembedding_bases(real.adapter)["unembed"].vectors,
        rtol=0,
        atol=0,
    )
    for spec in TINY.values():
        model, _ = build_random_model(spec)
        extra = spec.get("config", {})
        expected = extra.get("tie_word_embeddings", True) and "word_embed_proj_dim" not in extra
        adapter = Adapter(model)
        assert embeddings_tied(adapter) == expected, spec["arch"]
        if expected:
            torch.testing.assert_close(
                embedding_basis(adapter).vectors.abs(),
                unembedding_bases(adapter)["unembed"].vectors.abs(),
                rtol=1e-4,
                atol=1e-4,
            )
        untied = model.get_output_embeddings()
        untied.weight = torch.nn.Parameter(untied.weight.detach() + 1e-3)
        assert not embeddings_tied(Adapter(model))


@pytest.mark.workflow
def test_fit_rows_and_table_say_when_the_embedding_is_tied(tiny_run):
    """The tiny models tie W_E and W_U but the Pythia-shaped one: every H2 fit row says which,
    and the table's header carries the note only where they are tied."""
    workdir, config = tiny_run
    for run, spec in config["runs"].items():
        tied = config["models"][spec["model"]].get("config", {}).get("tie_word_embeddings", True)
        fit = pd.read_csv(workdir / "results" / run / "h2" / "fit.tsv", sep="\t")
        assert fit["embed_tied_to_unembed"].dtype == bool
        assert (fit["embed_tied_to_unembed"] == tied).all(), run
        assert (
            h2.TIED_NOTE in (workdir / "results" / "tables" / f"h2_{run}.md").read_text()
        ) == tied
    assert any(
        not spec.get("config", {}).get("tie_word_embeddings", True)
        for spec in config["models"].values()
    )
