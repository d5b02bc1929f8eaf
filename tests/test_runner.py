"""The block runner against the models' own forward pass, for every family in TINY."""

import torch

from lensspace.activations import residuals
from lensspace.runner import BlockRunner, hooked


def test_no_intervention_reproduces_model_logits(tiny, tiny_ids):
    adapter, _ = tiny
    runner = BlockRunner(adapter)
    expected = adapter.model(tiny_ids).logits
    h0 = adapter.embed_tokens(tiny_ids)
    assert (runner.logits(h0, start=0) - expected).abs().max() <= 1e-4


def test_resume_from_cached_residual_equals_hooked_full_forward(tiny, tiny_ids):
    adapter, _ = tiny
    runner = BlockRunner(adapter)
    res = residuals(adapter, tiny_ids)
    direction = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()

    def remove(h):
        return h - (h @ direction)[..., None] * direction

    for layer in range(adapter.n_layers):
        resumed = runner.logits(res[layer], start=layer, interventions={layer: remove})
        with torch.no_grad(), hooked(adapter, layer, remove):
            full = adapter.model(tiny_ids).logits
        assert (resumed - full).abs().max() <= 1e-4
        # and the intervention did change something
        assert (resumed - adapter.model(tiny_ids).logits).abs().max() > 1e-6


def test_permuted_order_equals_hand_written_forward(tiny, tiny_ids):
    """Each block runs with its own arguments wherever it sits in the order (Gemma 2/3 give
    sliding-window and global layers different masks; the tiny windows are shorter than the
    sequences, so block 0's arguments would be wrong for block 1 there)."""
    adapter, _ = tiny
    runner = BlockRunner(adapter)
    order = [2, 0, 1]
    h = adapter.embed_tokens(tiny_ids)
    expected = h
    with torch.no_grad():
        for index in order:
            args, kwargs = runner.block_context(*tiny_ids.shape, index)
            out = adapter.blocks[index](expected, *args, **kwargs)
            expected = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(runner.run(h, order=order), expected)
    assert not torch.allclose(runner.run(h, order=order), runner.run(h))


def test_blocks_get_their_own_masks_where_layer_types_differ(tiny, tiny_ids):
    adapter, _ = tiny
    runner = BlockRunner(adapter)
    masks = [
        runner.block_context(*tiny_ids.shape, i)[1].get("attention_mask")
        for i in range(adapter.n_layers)
    ]
    layer_types = getattr(adapter.model.config, "layer_types", None)
    if layer_types is None or len(set(layer_types)) == 1:
        return
    differ = [i for i in range(1, adapter.n_layers) if layer_types[i] != layer_types[0]]
    # sdpa passes no mask (None) for global layers and a tensor for sliding ones
    same = [
        masks[0] is masks[i]
        or (masks[0] is not None and masks[i] is not None and torch.equal(masks[0], masks[i]))
        for i in differ
    ]
    assert differ and not any(same)
