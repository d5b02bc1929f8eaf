"""Passes over the vocabulary fused into compiled CPU loops: H0's per-cell sums and a KL.

Eagerly, PyTorch runs every element-wise operation as its own pass over [N, V] memory, which
binds this work on a CPU; compiled by ``torch.compile`` (inductor's C++ backend) an expression
becomes one loop. :data:`change_sums`: a cell's KL from its logit change ``t = a k1 - d k2 + v k3
- c`` ([N, V]; per-row scalars [N, 1], a vector ``v`` [V]) through ``E_p[t]``, ``E_p[expm1(t)]``
and the row maximum of ``t``, one loop reading ``p``, ``a`` and ``d`` once instead of five to seven
passes; :data:`large_rows`: ``E_p[expm1(t)]`` again for the few rows whose ``t`` passes
:data:`SAFE_EXPONENT`, those terms in log space, the rows gathered inside the loop.
:data:`kl_sums`: KL(p || softmax(y)) against a fixed ``p``, with the entropy and top-1 token of
``softmax(y)`` (the neuron ablations), two loops instead of about eleven passes;
:data:`kl_terms`: the same KL alone (H1, H2, the shuffle, lens evaluation), two loops instead of
about nine passes.

The kernels run on the CPU only: on other devices (a GPU's memory bandwidth makes the passes
cheap), with ``compute.fused_cpu: false``, or where compiling fails (no C++ compiler: one line in
the log), callers run their eager passes. Their sums accumulate in float64. Loading them costs a
process about 4 s (importing the compiler stack; the compiled code is cached on disk), so only
the jobs whose work is mostly these passes use them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

_Sums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# exponent above which a token's term p * (e^t - 1) is formed in log space (exp(log p + t)):
# below it e^t cannot overflow, and a p lost to underflow (< 1.2e-38) drops under 1e-16
SAFE_EXPONENT = 50.0


def change_sums_definition(
    p: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    k3: torch.Tensor,
    c: torch.Tensor,
) -> _Sums:
    """``(E_p[t], E_p[expm1 t], max t)`` per row [N, 1], float64 sums, for
    ``t = a k1 - d k2 + v k3 - c``: what the kernel compiles."""
    t = a * k1 - d * k2 + v * k3 - c
    s0 = (p * t).double().sum(-1, keepdim=True)
    s1 = (p * expm1(t)).double().sum(-1, keepdim=True)
    return s0, s1, t.amax(-1, keepdim=True)


def large_rows_definition(
    rows: torch.Tensor,
    p: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v: torch.Tensor,
    k3: torch.Tensor,
    c: torch.Tensor,
    inv_s: torch.Tensor,
    c0: torch.Tensor,
    log_z: torch.Tensor,
) -> tuple[torch.Tensor]:
    """``E_p[expm1 t]`` [n, 1] in float64 for the ``rows`` [n] of :func:`change_sums_definition`'s
    ``t``, each term where ``t`` passes :data:`SAFE_EXPONENT` formed as ``exp(log p + t)`` in
    float64 (a ``p`` that float32 flushed to zero still counts; no overflow below 709), with
    ``log p = a inv_s + c0 - log_z`` (``inv_s``, ``log_z`` [N, 1], ``c0`` [V]): the clean
    log-probabilities, from the same ``a``."""
    a_r = a[rows]
    t = a_r * k1[rows] - d[rows] * k2[rows] + v * k3[rows] - c[rows]
    log_p = a_r * inv_s[rows] + c0 - log_z[rows]
    terms = torch.where(
        t > SAFE_EXPONENT, (log_p.double() + t.double()).exp(), (p[rows] * expm1(t)).double()
    )
    return (terms.sum(-1, keepdim=True),)


def expm1(t: torch.Tensor) -> torch.Tensor:
    """``e^t - 1`` to a few float32 ulps also for small ``t``: a Taylor series below |t| = 0.1
    (truncation about 2e-10 relative), ``exp(t) - 1`` above (about 5 ulps just past 0.1). Inductor's
    C++ backend compiles ``torch.expm1`` as ``exp(t) - 1``, which loses every digit as ``t`` goes to
    0."""
    series = t * (1 + t / 2 * (1 + t / 3 * (1 + t / 4 * (1 + t / 5 * (1 + t / 6)))))
    return torch.where(t.abs() < 0.1, series, torch.exp(t) - 1)


def kl_sums_definition(
    base: torch.Tensor, p: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum p (base - y), logsumexp(y), entropy of softmax(y), argmax y)`` per row [N],
    in float64 from float32 ``base`` (logits or log-probabilities of ``p``), ``p = softmax(base)``
    and ``y`` [N, V]. With ``p`` normalised by its sum (float32 leaves it about 1e-6 off 1, which a
    logit-sized log-sum-exp would multiply; the caller sums ``p`` once), KL(p || softmax(y)) = the
    first / sum p + the second - logsumexp(base). The differences ``base - y`` are exact in float64,
    so no logit-sized rounding enters the KL (float32's ``exp`` leaves an absolute floor of about
    1e-7); the entropy
    is ``log s - sum e^u u / s`` with ``u = y - max y`` and ``s = sum e^u``."""
    m = y.amax(-1, keepdim=True)
    u = y - m
    e = u.exp().double()
    s = e.sum(-1)
    entropy = s.log() - (e * u.double()).sum(-1) / s
    cross = (p.double() * (base.double() - y.double())).sum(-1)
    return cross, m.squeeze(-1).double() + s.log(), entropy, y.argmax(-1)


def kl_terms_definition(
    base: torch.Tensor, p: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum p (base - y), logsumexp(y))`` per row [N], float64 sums from float32 [N, V]: the KL
    terms of :func:`kl_sums_definition` without the entropy and top-1 token."""
    m = y.amax(-1, keepdim=True)
    s = (y - m).exp().double().sum(-1)
    cross = (p.double() * (base.double() - y.double())).sum(-1)
    return cross, m.squeeze(-1).double() + s.log()


# Below this many elements (a real model's [tokens, V] has tens of millions) the eager passes
# take milliseconds and a process would pay the kernels' loading for nothing: tiny test models.
MIN_ELEMENTS = 1 << 20


FIRST_CALL_LINE = "[lensspace] fused kernel first call:"  # provenance.logged_startups reads it


class _Kernel:
    """A compiled ``definition``, built on first use. ``usable(x)``: on the CPU, enabled, not
    failed, and ``x`` of at least :data:`MIN_ELEMENTS`; elsewhere callers run their eager passes."""

    def __init__(self, definition: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        self.definition = definition
        self.enabled = True
        self.failed: str | None = None
        self._compiled: Callable[..., tuple[torch.Tensor, ...]] | None = None

    def usable(self, x: torch.Tensor) -> bool:
        return (
            self.enabled
            and self.failed is None
            and x.device.type == "cpu"
            and x.numel() >= MIN_ELEMENTS
        )

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The sums, or None where compiling failed (the reason printed once to the log)."""
        if self.failed is not None:
            return None
        try:
            if self._compiled is not None:
                return self._compiled(*args)
            started = time.perf_counter()
            self._compiled = torch.compile(self.definition, dynamic=True, fullgraph=True)
            sums = self._compiled(*args)
            print(
                f"{FIRST_CALL_LINE} {self.definition.__name__} {time.perf_counter() - started:.2f} "
                "s "
                "(loaded from the compile cache or compiled, then one call)",
                file=sys.stderr,
            )
            return sums
        except Exception as err:  # a missing compiler or an inductor limit: many types
            self.failed = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            print(
                f"[lensspace] fused vocabulary kernel {self.definition.__name__} unavailable "
                f"({self.failed}); running eagerly",
                file=sys.stderr,
            )
            return None


change_sums = _Kernel(change_sums_definition)
large_rows = _Kernel(large_rows_definition)
kl_sums = _Kernel(kl_sums_definition)
kl_terms = _Kernel(kl_terms_definition)
KERNELS = (change_sums, large_rows, kl_sums, kl_terms)


def enable(flag: bool) -> None:
    """Use the compiled kernels on the CPU (``compute.fused_cpu``), or never."""
    for kernel in KERNELS:
        kernel.enabled = flag
