"""float32 matrix products on the CPU through oneDNN rather than PyTorch's default BLAS.

PyTorch runs a CPU float32 ``linear`` through MKL. On the AMD EPYC machines this project is
measured on, MKL reaches 135-190 GFLOP/s on two cores for the model's and the unembedding's
shapes, while oneDNN, which ships in the same wheel (``torch.ops.mkldnn._linear_pointwise``),
reaches 340-440 GFLOP/s for the same products at the same float32 precision (relative error
against float64 8e-7, MKL's 4e-7; ``benchmarks/gemm.py`` measures both side by side).
:func:`linear` routes CPU float32 products there, with gradients (the refinements backpropagate
through the head); :func:`route_linears` makes a model's ``nn.Linear`` layers use it. Other
devices, other dtypes, ``compute.onednn_cpu: false`` or a wheel without the operator keep
``torch.nn.functional.linear``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn import functional as F

_state = {"enabled": True, "failed": None}


def enable(flag: bool) -> None:
    """Route CPU float32 products through oneDNN (``compute.onednn_cpu``), or never."""
    _state["enabled"] = flag


def _operator():
    """oneDNN's linear, or None where this wheel lacks it (the reason printed once)."""
    if _state["failed"] is None:
        try:
            if not torch.backends.mkldnn.is_available():
                raise RuntimeError("PyTorch was built without oneDNN")
            return torch.ops.mkldnn._linear_pointwise
        except (AttributeError, RuntimeError) as err:
            _state["failed"] = f"{type(err).__name__}: {err}"
            print(
                f"[lensspace] oneDNN products unavailable ({_state['failed']}); using torch's "
                "default",
                file=sys.stderr,
            )
    return None


def active() -> bool:
    """Whether CPU float32 products go through oneDNN in this process."""
    return _state["enabled"] and _operator() is not None


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """``x W^T + b`` by oneDNN, with its gradients: ``g W`` (oneDNN again, ``W^T`` as the
    weight), ``g^T x`` and the sum of ``g``, each only where asked for."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad.contiguous(), weight.t(), None)
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: through oneDNN for float32 CPU tensors when :func:`active`."""
    if (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel()
        and (bias is None or bias.dtype == torch.float32)
        and active()
    ):
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return _Linear.apply(x, weight, bias)
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


class RoutedLinear(nn.Linear):
    """An ``nn.Linear`` whose product is :func:`linear`'s (same parameters, same state dict)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


def route_linears(model: nn.Module) -> nn.Module:
    """Every plain ``nn.Linear`` of ``model`` computes through :func:`linear` (in place)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = RoutedLinear
    return model
