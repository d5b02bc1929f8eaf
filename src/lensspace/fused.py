"""One pass over the vocabulary per ablation cell: the sums H0's KL needs, fused.

A cell's KL comes from its logit change ``t = a k1 - d k2 + v k3 - c`` ([N, V]; per-row scalars
``k1, k2, k3, c`` [N, 1], a vector ``v`` [V]) through ``E_p[t]``, ``E_p[expm1(t)]`` and the row
maximum of ``t``. Eagerly, PyTorch runs each operation as its own pass over [N, V] memory (five
to seven a cell, bound by memory traffic on a CPU); compiled by ``torch.compile`` (inductor's C++
backend) the whole expression is one loop that reads ``p``, ``a`` and ``d`` once. The compiled
kernel runs on the CPU only: on other devices (a GPU's memory bandwidth makes the passes cheap),
with ``compute.fused_cpu: false``, or where compiling fails (no C++ compiler: one line in the log),
callers run their eager passes. The kernel's sums accumulate in float64, so its KLs agree with the
eager ones to the float32 rounding of ``t`` itself.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

_Sums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def change_sums_definition(p: torch.Tensor, a: torch.Tensor, d: torch.Tensor, k1: torch.Tensor,
                           k2: torch.Tensor, v: torch.Tensor, k3: torch.Tensor, c: torch.Tensor) -> _Sums:
    """``(E_p[t], E_p[expm1 t], max t)`` per row [N, 1], float64 sums, for
    ``t = a k1 - d k2 + v k3 - c``: what the kernel compiles."""
    t = a * k1 - d * k2 + v * k3 - c
    s0 = (p * t).double().sum(-1, keepdim=True)
    s1 = (p * expm1(t)).double().sum(-1, keepdim=True)
    return s0, s1, t.amax(-1, keepdim=True)


def expm1(t: torch.Tensor) -> torch.Tensor:
    """``e^t - 1`` to float32's relative precision also for small ``t``: a Taylor series below
    |t| = 0.1 (truncation below 1e-10 relative), ``exp(t) - 1`` above. Inductor's C++ backend
    compiles ``torch.expm1`` as ``exp(t) - 1``, which loses every digit as ``t`` goes to 0."""
    series = t * (1 + t / 2 * (1 + t / 3 * (1 + t / 4 * (1 + t / 5 * (1 + t / 6)))))
    return torch.where(t.abs() < 0.1, series, torch.exp(t) - 1)


class _Kernel:
    """The compiled kernel, built on first use. ``usable(x)``: on the CPU, enabled, and not failed;
    elsewhere callers run their eager passes."""

    def __init__(self) -> None:
        self.enabled = True
        self.failed: str | None = None
        self._compiled: Callable[..., _Sums] | None = None

    def usable(self, x: torch.Tensor) -> bool:
        return self.enabled and self.failed is None and x.device.type == "cpu"

    def __call__(self, *args: torch.Tensor) -> _Sums | None:
        """The sums, or None where compiling failed (the reason printed once to the log)."""
        try:
            if self._compiled is None:
                self._compiled = torch.compile(change_sums_definition, dynamic=True, fullgraph=True)
            return self._compiled(*args)
        except Exception as err:  # a missing compiler or an inductor limit: many types
            self.failed = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            print(f"[lensspace] fused vocabulary kernel unavailable ({self.failed}); running eagerly",
                  file=sys.stderr)
            return None


change_sums = _Kernel()


def enable(flag: bool) -> None:
    """Use the compiled kernel on the CPU (``compute.fused_cpu``), or never."""
    change_sums.enabled = flag
