"""The architecture adapter against the models' own forward pass (GPT-2 and Llama families)."""

import pytest
import torch
from torch import nn

from lensspace.activations import residuals
from lensspace.adapter import Adapter
from lensspace.errors import LensspaceError


def test_parts_and_shapes(tiny):
    adapter, tokenizer = tiny
    assert adapter.n_layers == 3
    assert adapter.d_model == 32
    assert adapter.unembedding.shape == (len(tokenizer), 32)
    assert adapter.unembedding is adapter.model.get_output_embeddings().weight
    assert isinstance(adapter.blocks, nn.ModuleList)


def test_residuals_match_hidden_states(tiny, tiny_ids):
    adapter, _ = tiny
    out = adapter.model(tiny_ids, output_hidden_states=True)
    res = residuals(adapter, tiny_ids)
    assert len(res) == adapter.n_layers + 1
    for i in range(adapter.n_layers):
        torch.testing.assert_close(res[i], out.hidden_states[i], rtol=0, atol=0)
    # transformers' last hidden state is AFTER the final norm; ours (index L) is before it
    torch.testing.assert_close(adapter.final_norm(res[-1]), out.hidden_states[-1], rtol=0, atol=1e-6)
    assert not torch.allclose(res[-1], out.hidden_states[-1])


def test_head_reproduces_model_logits(tiny, tiny_ids):
    adapter, _ = tiny
    logits = adapter.model(tiny_ids).logits
    final = residuals(adapter, tiny_ids)[-1]
    assert (adapter.logits(final) - logits).abs().max() < 1e-4


def test_split_norm_equals_module(tiny):
    adapter, _ = tiny
    z = torch.randn(5, adapter.d_model) * 3 + 1
    torch.testing.assert_close(adapter.norm_affine(adapter.normalize(z)), adapter.final_norm(z),
                               rtol=1e-5, atol=1e-5)


def test_embed_tokens_is_layer_zero(tiny, tiny_ids):
    adapter, _ = tiny
    torch.testing.assert_close(adapter.embed_tokens(tiny_ids), residuals(adapter, tiny_ids)[0])


def test_unknown_family_is_refused():
    class Fake(nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(LensspaceError, match="mamba.*supported"):
        Adapter(Fake())
