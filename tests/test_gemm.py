"""oneDNN float32 products (lensspace.gemm) against float64 and against torch's default path."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lensspace import gemm


def _scale_error(
    got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> float:
    """Largest error relative to the products' natural size, ``|x| |W|`` per entry."""
    size = x.double().abs() @ weight.double().abs().T
    return float(((got.double() - want) / size).abs().max())


@pytest.mark.parametrize("shape", [(7, 64), (3, 33, 576), (512, 576)])
@pytest.mark.parametrize("out", [192, 4099])
def test_linear_is_a_float32_product(shape, out):
    """oneDNN's product, with and without bias, on contiguous and sliced inputs: within float32
    rounding of float64 (about sqrt(d) ulps of |x||W|), as close as torch's default."""
    assert gemm.active(), "this wheel ships oneDNN: the workflow's CPU products go through it"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen) * 3
    weight, bias = torch.randn(out, shape[-1], generator=gen), torch.randn(out, generator=gen)
    for inp in (x, x[..., 1:, :] if x.dim() == 3 else x[1:]):
        for b in (None, bias):
            want = F.linear(inp.double(), weight.double(), None if b is None else b.double())
            got = gemm.linear(inp, weight, b)
            assert got.shape == want.shape and got.dtype == torch.float32
            default = F.linear(inp, weight, b)
            assert _scale_error(got, want, inp, weight) < max(
                4 * _scale_error(default, want, inp, weight), 1e-6
            )


def test_gradients_are_the_products_gradients():
    """Through ``_Linear``: d/dx = g W, d/dW = g^T x, d/db = sum g, each against float64
    autograd."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 48, generator=gen, requires_grad=True)
    weight = torch.randn(300, 48, generator=gen, requires_grad=True)
    bias = torch.randn(300, generator=gen, requires_grad=True)
    g = torch.randn(4, 9, 300, generator=gen)
    (gemm.linear(x, weight, bias) * g).sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, weight, bias))
    (F.linear(x64, w64, b64) * g.double()).sum().backward()
    for got, want in ((x.grad, x64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_only_the_input_gradient_when_the_weight_is_frozen():
    """The refinements' case: a frozen head, gradients flow to the input only."""
    x = torch.randn(5, 40, requires_grad=True)
    weight = torch.randn(70, 40)
    gemm.linear(x, weight).square().sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    F.linear(x64, weight.double()).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-4)
    assert weight.grad is None


def test_disabled_is_torch_default(monkeypatch):
    """``compute.onednn_cpu: false``: exactly torch's product; float64 never goes to oneDNN."""
    x, weight = torch.randn(16, 64), torch.randn(128, 64)
    monkeypatch.setitem(gemm._state, "enabled", False)
    assert torch.equal(gemm.linear(x, weight), F.linear(x, weight))
    monkeypatch.setitem(gemm._state, "enabled", True)
    assert torch.equal(
        gemm.linear(x.double(), weight.double()), F.linear(x.double(), weight.double())
    )


def test_route_linears_keeps_parameters_and_other_modules():
    """Routing swaps the class of plain ``nn.Linear`` layers only: the same parameter objects,
    the same state dict, subclasses and other layers untouched."""

    class Custom(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Custom(16, 4), nn.Embedding(5, 8))
    params = {name: p for name, p in model.named_parameters()}
    gemm.route_linears(model)
    assert type(model[0]) is gemm.RoutedLinear and type(model[2]) is Custom
    assert {name: p for name, p in model.named_parameters()} == params
    x = torch.randn(3, 8)
    torch.testing.assert_close(
        model[0](x), F.linear(x, model[0].weight, model[0].bias), rtol=1e-5, atol=1e-6
    )


def test_real_model_outputs_agree_with_torch_default(real, monkeypatch):
    """The default model's last-layer logits over real text with its linear layers routed to
    oneDNN against torch's default path: the same distributions to float32 rounding."""
    from lensspace.runner import BlockRunner

    h = real.cache.load(0, "eval")[:2].float()
    runner = BlockRunner(real.adapter)
    with torch.no_grad():
        monkeypatch.setitem(gemm._state, "enabled", False)
        default = real.adapter.logits(runner.run(h, start=0)).double()
        monkeypatch.setitem(gemm._state, "enabled", True)
        routed = real.adapter.logits(runner.run(h, start=0)).double()
    assert type(real.adapter.output_embedding) is gemm.RoutedLinear
    assert not torch.equal(routed, default)  # a different kernel ran
    kl = (default.softmax(-1) * (default.log_softmax(-1) - routed.log_softmax(-1))).sum(-1)
    assert float(kl.abs().max()) < 1e-6
    torch.testing.assert_close(routed, default, rtol=0, atol=2e-3 * float(default.abs().max()))
