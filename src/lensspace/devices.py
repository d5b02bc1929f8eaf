"""Where tensors live: the one function that moves them to the compute device, the batch sizes
per device kind, and the fp32 policy (TF32 off unless the config allows it).

The adapter owns the device (``Adapter.device``, where the model's weights are); lenses, SVD
bases, random subspaces and the activation cache's tensors follow it through :func:`move`.
Random draws are made on the CPU from CPU generators and then moved, so a CPU run and a GPU
run ablate the same subspaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def move(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; itself when already there. CPU -> GPU goes through pinned memory
    with a non-blocking copy (the copy overlaps the host's next work; CUDA orders it before
    any kernel that reads the result)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def move_module(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module`` with every parameter and buffer moved by :func:`move` (in place; tied
    parameters stay tied, and those already on ``device`` are left as they are)."""
    device = torch.device(device)
    moved: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for table, wrap in ((sub._parameters, True), (sub._buffers, False)):
            for name, t in table.items():
                if t is None or t.device == device:
                    continue
                if id(t) not in moved:
                    data = move(t.detach(), device)
                    moved[id(t)] = nn.Parameter(data, t.requires_grad) if wrap else data
                table[name] = moved[id(t)]
    return module


@dataclass(frozen=True)
class ComputeSettings:
    """Sequences per batch, per device kind, and the fp32 policy.

    ``chunk_sequences``: held-out sequences evaluated together by the lens evaluation and the
    experiments; ``cache_batch_size``: sequences per forward pass when caching. Batch sizes
    change results only by float rounding (and not at all on the CPU at the defaults, which
    are the values the study always used). ``allow_tf32``: TF32 matrix products on GPUs that
    have them (about 1e-3 relative error instead of fp32's 1e-7); off by default.
    ``fused_cpu``: the vocabulary passes of H0, of the neuron ablations and of every KL against
    a reference as compiled loops on the CPU (:mod:`lensspace.fused`). ``onednn_cpu``: CPU
    float32 products by oneDNN (:mod:`lensspace.gemm`).
    """

    chunk_sequences: int = 4
    gpu_chunk_sequences: int = 16
    cache_batch_size: int = 8
    gpu_cache_batch_size: int = 32
    allow_tf32: bool = False
    fused_cpu: bool = True
    onednn_cpu: bool = True

    def chunk(self, device: torch.device | str) -> int:
        return (
            self.gpu_chunk_sequences
            if torch.device(device).type == "cuda"
            else self.chunk_sequences
        )

    def cache_batch(self, device: torch.device | str) -> int:
        return (
            self.gpu_cache_batch_size
            if torch.device(device).type == "cuda"
            else self.cache_batch_size
        )


def configure_numerics(allow_tf32: bool) -> None:
    """fp32 matrix products stay fp32 (``highest``) unless TF32 is allowed."""
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")


def describe(device: torch.device | str) -> dict:
    """What a result was computed on: device, GPU name and CUDA version or the CPU's product
    library (:mod:`lensspace.gemm`), matmul precision."""
    device = torch.device(device)
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cpu":
        from lensspace import gemm

        info["cpu_products"] = "oneDNN" if gemm.active() else "default"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
