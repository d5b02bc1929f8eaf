"""KL divergences and bootstrap confidence intervals over sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats along the last axis, from log-probabilities."""
    return torch.sum(logp.exp() * (logp - logq), dim=-1)


def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) in nats along the last axis, computed in fp32."""
    return kl_from_logprobs(p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1))


@dataclass(frozen=True)
class Estimate:
    """A token-mean with its percentile bootstrap interval over sequences."""

    mean: float
    lo: float
    hi: float
    n_tokens: int


def bootstrap_mean(values: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> Estimate:
    """Mean over all entries of ``values`` [n_sequences, n_positions]; resample sequences.

    Every sequence has the same number of evaluated positions, so the token mean is the mean
    of sequence means and the bootstrap resamples those.
    """
    values = values.double()
    per_seq = values.mean(dim=1)
    n = per_seq.numel()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    means = per_seq[idx].mean(dim=1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return Estimate(float(per_seq.mean()), float(lo), float(hi), int(values.numel()))
