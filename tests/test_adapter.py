"""The architecture adapter against the models' own forward pass, for every family in TINY."""

import pytest
import torch
from torch import nn

from lensspace.activations import residuals
from lensspace.adapter import ADAPTER_FILE, ARCHITECTURES, Adapter, supported_families
from lensspace.errors import LensspaceError


def test_parts_and_shapes(tiny):
    adapter, tokenizer = tiny
    assert adapter.n_layers == 3
    assert adapter.d_model == 32
    assert adapter.unembedding.shape == (len(tokenizer), 32)
    assert adapter.embedding_matrix.shape == (len(tokenizer), 32)
    assert isinstance(adapter.blocks, nn.ModuleList)
    w_u = adapter.model.get_output_embeddings().weight
    if adapter.head_projection is None:
        assert adapter.unembedding is w_u
    else:  # OPT-350m: project_out folded into W_U
        torch.testing.assert_close(adapter.unembedding, w_u @ adapter.head_projection.weight)


def test_residuals_match_hidden_states(tiny, tiny_ids):
    adapter, _ = tiny
    out = adapter.model(tiny_ids, output_hidden_states=True)
    res = residuals(adapter, tiny_ids)
    assert len(res) == adapter.n_layers + 1
    for i in range(adapter.n_layers):
        torch.testing.assert_close(res[i], out.hidden_states[i], rtol=0, atol=0)
    if adapter.final_norm is not None:
        # transformers' last hidden state is AFTER the final norm (and OPT's project_out);
        # ours (index L) is before them
        after = adapter.final_norm(res[-1])
        after = adapter.head_projection(after) if adapter.head_projection is not None else after
        torch.testing.assert_close(after, out.hidden_states[-1], rtol=0, atol=1e-6)
        assert not torch.allclose(res[-1][..., : after.shape[-1]], out.hidden_states[-1])


def test_head_reproduces_model_logits(tiny, tiny_ids):
    adapter, _ = tiny
    logits = adapter.model(tiny_ids).logits
    final = residuals(adapter, tiny_ids)[-1]
    assert (adapter.logits(final) - logits).abs().max() < 1e-4
    # and by hand: W_U (with any projection folded in) on the split norm, then the soft-cap
    by_hand = adapter.norm_affine(adapter.normalize(final)) @ adapter.unembedding.T
    if adapter.logit_softcap is not None:
        by_hand = adapter.logit_softcap * torch.tanh(by_hand / adapter.logit_softcap)
    assert (by_hand - logits).abs().max() < 1e-4


def test_soft_cap_bends_the_logits_where_the_family_has_one(tiny, tiny_ids):
    adapter, _ = tiny
    cap = getattr(adapter.model.config, "final_logit_softcapping", None)
    assert adapter.logit_softcap == cap
    if cap is None:
        return
    logits = adapter.model(tiny_ids).logits
    assert logits.abs().max() < cap
    final = residuals(adapter, tiny_ids)[-1]
    uncapped = adapter.norm_affine(adapter.normalize(final)) @ adapter.unembedding.T
    assert (uncapped - logits).abs().max() > 0.1  # the cap matters in this tiny model


def test_split_norm_equals_module(tiny):
    adapter, _ = tiny
    z = torch.randn(5, adapter.d_model) * 3 + 1
    split = adapter.norm_affine(adapter.normalize(z))
    if adapter.final_norm is None:  # OPT-350m: nothing between the last block and project_out
        assert adapter.norm_kind == "none"
        torch.testing.assert_close(split, z)
        return
    torch.testing.assert_close(split, adapter.final_norm(z), rtol=1e-5, atol=1e-5)
    # the gain is not the identity in these tiny models, so this checks it (and Gemma's 1 + w)
    assert (adapter.norm_gain - 1).abs().max() > 1e-3 or adapter.model_type in ("gpt2", "llama")


def test_embedding_matrix_is_the_token_part_of_layer_zero(tiny, tiny_ids):
    """Layer 0 minus the embedding rows of its tokens is the same for any tokens: positions only
    (zero for rotary families). Holds with Gemma's sqrt(d) scale and OPT's project_in."""
    adapter, _ = tiny
    other = (tiny_ids + 17) % 256
    e = adapter.embedding_matrix
    rest = [adapter.embed_tokens(ids) - e[ids] for ids in (tiny_ids, other)]
    torch.testing.assert_close(rest[0], rest[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(adapter.embed_tokens(tiny_ids), residuals(adapter, tiny_ids)[0])
    assert (adapter.embed_tokens(tiny_ids) - adapter.embed_tokens(other)).abs().max() > 1e-3


def test_unknown_family_is_refused():
    class Fake(nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(LensspaceError, match="mamba.*supported") as err:
        Adapter(Fake())
    assert all(family in str(err.value) for family in supported_families())
    assert ADAPTER_FILE in str(err.value)


def test_tiny_table_covers_every_family():
    from conftest import TINY

    assert {spec["arch"] for spec in TINY.values()} == set(ARCHITECTURES)
