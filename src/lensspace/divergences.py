"""KL divergences between distributions given as logits or log-probabilities: one-off, against a
fixed reference (with the entropy and top-1 token of the other), and as a training loss."""

from __future__ import annotations

from typing import NamedTuple

import torch


def kl_from_logprobs(
    logp: torch.Tensor, logq: torch.Tensor, p: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p || q) in nats along the last axis, from log-probabilities (``p = exp(logp)`` may be
    passed in when many ``q`` are compared with one ``p``: it saves a pass over the vocabulary)."""
    return torch.sum((logp.exp() if p is None else p) * (logp - logq), dim=-1)


class _KLLoss(torch.autograd.Function):
    """Mean token KL(p || softmax(y)) with its gradient in closed form, ``(softmax(y) - p) / N``,
    from the forward pass's ``exp(y - max y)``: six passes over the vocabulary where autograd
    through ``log_softmax`` and the product takes about fifteen."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, p: torch.Tensor, p_logp: torch.Tensor) -> torch.Tensor:
        shifted = y - y.amax(
            -1, keepdim=True
        )  # <= 0, near 0 where p has its mass: little cancellation
        # E_p[y - max y] as a batched dot product (no [N, V] temporary), then exp in place
        p_shifted = row_dot(p, shifted).unsqueeze(-1)
        e = shifted.exp_()
        total = e.sum(-1, keepdim=True)
        ctx.save_for_backward(e, p, total)
        return (p_logp.unsqueeze(-1) - p_shifted + total.log()).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        e, p, total = ctx.saved_tensors
        scale = float(grad) / (e.numel() // e.shape[-1])  # the loss is a scalar
        return torch.mul(e, scale / total).sub_(p, alpha=scale), None, None


def row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum(x * y, -1)`` for real tensors of one shape [..., V], as a batched matrix product: one
    pass without an [..., V] temporary (``torch.linalg.vecdot`` forms the products first, about 3x
    slower over a vocabulary on the CPU)."""
    return (x.unsqueeze(-2) @ y.unsqueeze(-1)).reshape(x.shape[:-1])


def kl_target(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed target of :func:`kl_loss` from its log-probabilities: ``p`` and ``sum p log p`` per
    row."""
    p = logp.exp()
    return p, row_dot(p, logp)


def kl_loss(y: torch.Tensor, p: torch.Tensor, p_logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || softmax(y)) along the last axis, differentiable in the logits
    ``y``: ``p`` (rows summing to 1) and ``p_logp = sum p log p`` per row [...] are the fixed
    target. A training loss: its value from a float32 dot product with ``y - max y`` (about 1e-5
    relative on logit-sized values), its gradient to float32 rounding."""
    return _KLLoss.apply(y, p, p_logp)


class OutputStats(NamedTuple):
    """One ``q`` against the reference, per row: KL(p || q), the entropy of ``q`` (float64) and its
    top-1 index."""

    kl: torch.Tensor
    entropy: torch.Tensor
    top1: torch.Tensor


class KLReference:
    """One distribution ``p`` (log-probabilities ``logp`` [..., V], or :meth:`from_logits`)
    against many ``q`` given as logits.

    On the CPU both comparisons run compiled loops (:mod:`lensspace.fused`) over
    ``E_p[l - y] + logsumexp(y) - logsumexp(l)`` (``p`` normalised; ``l`` the reference's logits,
    or its log-probabilities), the differences and sums in float64: :meth:`kl` by
    :data:`~lensspace.fused.kl_terms`, :meth:`compare`, which adds the entropy and top-1 token of
    ``q``, by :data:`~lensspace.fused.kl_sums`. A ``q`` whose logits equal ``l`` gives 0 exactly.
    Elsewhere (a GPU, ``compute.fused_cpu: false``, no compiler) they run eager passes; :meth:`kl`
    then turns the logits into ``p * (logp - log q)`` in place: one vocabulary-sized allocation
    per comparison (a float32 dot product over the vocabulary, tried first, drifted by 1e-4
    relative). Loading the kernels costs a process about 4 s (the compiler stack); it pays for
    itself from about fifty comparisons of 500 tokens.
    """

    def __init__(self, logp: torch.Tensor):
        self._logp, self._base, self.p = logp, logp, logp.exp()
        self._rows = self._mass = None  # the fused paths' 2-D views and sum of p, on first use
        self._lse: dict[
            int, torch.Tensor | None
        ] = {}  # logsumexp(base) per kernel, by its own loop

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> KLReference:
        """The reference ``softmax(logits)``, keeping the logits rather than the log-probabilities
        (made only if an eager path needs them), so the fused comparison of the same logits is 0."""
        reference = cls.__new__(cls)
        reference._logp, reference._base, reference.p = None, logits, logits.softmax(-1)
        reference._rows = reference._mass = None
        reference._lse = {}
        return reference

    @property
    def logp(self) -> torch.Tensor:
        if self._logp is None:
            self._logp = self._base.log_softmax(-1)
        return self._logp

    def _fused(
        self, kernel, q_logits: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor] | None:
        """``kernel``'s sums for ``q_logits`` and the KL assembled from them (shape of the rows),
        or None where the kernel is off, elsewhere than the CPU, or failed."""
        if not kernel.usable(q_logits) or q_logits.numel() != self._base.numel():
            return None  # (broadcast comparisons, none in the workflow, run eagerly)
        vocab = self._base.shape[-1]
        if self._rows is None:
            self._rows = (self._base.reshape(-1, vocab), self.p.reshape(-1, vocab))
            self._mass = self._rows[1].double().sum(-1)
        if id(kernel) not in self._lse:
            sums = kernel(
                *self._rows, self._rows[0].clone()
            )  # a copy: no aliased inputs to compile for
            self._lse[id(kernel)] = sums[1] if sums is not None else None
        if self._lse[id(kernel)] is None:
            return None
        sums = kernel(*self._rows, q_logits.reshape(-1, vocab))
        if sums is None:
            return None
        kl = (
            (sums[0] / self._mass + sums[1] - self._lse[id(kernel)])
            .float()
            .reshape(q_logits.shape[:-1])
        )
        return sums, kl

    def kl(self, q_logits: torch.Tensor) -> torch.Tensor:
        """KL(p || softmax(q_logits)) along the last axis; ``q_logits`` may be overwritten."""
        from lensspace import fused

        done = self._fused(fused.kl_terms, q_logits)
        if done is not None:
            return done[1]
        # as log_softmax does: shift by the max first (exact), so that the log of the sum is
        # small; subtracting the whole log-sum-exp at once would shift every log q by its rounding
        q_logits.sub_(q_logits.amax(dim=-1, keepdim=True))
        q_logits.sub_(q_logits.exp().sum(dim=-1, keepdim=True).log_())
        return torch.sub(self.logp, q_logits, out=q_logits).mul_(self.p).sum(-1)

    def compare(self, q_logits: torch.Tensor) -> OutputStats:
        """KL(p || q), the entropy of ``q = softmax(q_logits)`` and its top-1 index, along the last
        axis; ``q_logits`` is left as it is."""
        from lensspace import fused

        done = self._fused(fused.kl_sums, q_logits)
        if done is not None:
            (_, _, entropy, top1), kl = done
            shape = q_logits.shape[:-1]
            return OutputStats(kl, entropy.reshape(shape), top1.reshape(shape))
        top1 = q_logits.argmax(-1)
        logq = q_logits.log_softmax(-1)
        entropy = -(logq.exp() * logq).double().sum(-1)
        return OutputStats(kl_from_logprobs(self.logp, logq, self.p), entropy, top1)


def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) in nats along the last axis, computed in fp32."""
    return kl_from_logprobs(p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1))
