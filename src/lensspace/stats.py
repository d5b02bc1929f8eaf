"""Bootstrap intervals over sequences, paired comparisons and multiplicity corrections.

Sequences are the independent units: every interval and test resamples whole sequences, so the
dependence between the tokens of one sequence is kept. Per-sequence mean KLs are few (8-32) and
right-skewed, where a percentile bootstrap covers too rarely (0.89 for a nominal 0.95 at 16
sequences drawn from a lognormal as skewed as the real values, 0.86-0.90 drawing from the real
values themselves). The default is the studentized bootstrap (bootstrap-t), the best of
percentile, BCa and bootstrap-t in that simulation (0.93 at 16 sequences on the lognormal);
``validation/coverage.py`` measures it, ``tests/test_stats.py`` keeps the check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lensspace.errors import LensspaceError

Method = Literal["studentized", "bca", "percentile"]
METHODS: tuple[Method, ...] = ("studentized", "bca", "percentile")
DEFAULT_METHOD: Method = "studentized"


@dataclass(frozen=True)
class Estimate:
    """A token-mean with its bootstrap interval over sequences (``method`` names which one)."""

    mean: float
    lo: float
    hi: float
    n_tokens: int
    n_sequences: int = 0
    method: str = DEFAULT_METHOD


def sequence_means(values: torch.Tensor) -> torch.Tensor:
    """Per-sequence means in float64, on the CPU (where the resampling runs, from CPU
    generators): [n_seq, n_pos] -> [n_seq]; [n_seq] is taken as given."""
    values = torch.as_tensor(values).double().cpu()
    if values.dim() == 1:
        return values
    if values.dim() == 2:
        return values.mean(dim=1)
    raise LensspaceError(
        f"expected [n_sequences] or [n_sequences, n_positions], got shape {tuple(values.shape)}"
    )


def resample_counts(n: int, n_boot: int, seed: int) -> torch.Tensor:
    """[n_boot, n] float64: how often each of ``n`` sequences is drawn in each resample.

    ``counts @ x / n`` is then every resample's mean at once (and ``counts @ x**2`` its spread).
    """
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_boot, n, dtype=torch.float64)
    )


def _studentized(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard errors of the means of samples ``x`` [R, n] and the resamples' t statistics
    ``(m* - m) / se*`` [R, n_boot].

    A resample with no spread (one sequence drawn n times) gets a tiny floor on ``se*``,
    which makes its t extreme rather than undefined.
    """
    n = x.shape[1]
    xc = x - x.mean(dim=1, keepdim=True)
    se = xc.square().sum(dim=1).div((n - 1) * n).sqrt()  # [R]
    m_star = xc @ counts.T / n  # [R, n_boot]
    var_star = (xc.square() @ counts.T / n - m_star.square()).clamp_min(0) * n / (n - 1)
    se_star = (var_star / n).sqrt().clamp_min(1e-9 * se.unsqueeze(1))
    return se, m_star / se_star


def _row_quantiles(values: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles of each row of ``values`` [R, B] at per-row ``probs`` [R,
    k]."""
    ordered = values.sort(dim=1).values
    pos = probs.clamp(0, 1) * (values.shape[1] - 1)
    below = pos.floor().long()
    above = pos.ceil().long()
    lo, hi = ordered.gather(1, below), ordered.gather(1, above)
    return lo + (hi - lo) * (pos - below)


def bootstrap_intervals(
    samples: torch.Tensor,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    method: Method = DEFAULT_METHOD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-tailed ``level`` intervals ``(lo, hi)`` [R] for the means of R independent samples
    of per-sequence values ``samples`` [R, n], all resampled with the same resample counts
    (``bootstrap_interval`` is one row of it; many rows at once make simulations cheap).

    ``studentized``: bootstrap-t, ``[m - q_hi se, m - q_lo se]`` with ``q`` the quantiles of
    ``(m* - m) / se*``. ``bca``: bias-corrected and accelerated percentile (acceleration from
    the jackknife). ``percentile``: quantiles of ``m*`` (kept for comparison; covers too rarely
    on few skewed sequences). A sample whose values are all equal gets ``lo = hi = mean``.
    """
    x = torch.as_tensor(samples).double()
    if x.dim() != 2 or x.shape[1] < 2:
        raise LensspaceError(
            f"an interval over sequences needs [R, n >= 2] values, got shape {tuple(x.shape)}"
        )
    if not 0 < level < 1:
        raise LensspaceError(f"level must lie in (0, 1), got {level}")
    r, n = x.shape
    m = x.mean(dim=1)
    alpha = (1 - level) / 2
    tails = torch.tensor([[alpha, 1 - alpha]], dtype=torch.float64).expand(r, 2)
    counts = resample_counts(n, n_boot, seed)
    if method == "studentized":
        se, t = _studentized(x, counts)
        q = _row_quantiles(t, tails)
        lo, hi = m - q[:, 1] * se, m - q[:, 0] * se
    elif method in ("percentile", "bca"):
        m_star = x @ counts.T / n
        q = _row_quantiles(
            m_star, tails if method == "percentile" else _bca_levels(x, m_star, alpha)
        )
        lo, hi = q[:, 0], q[:, 1]
    else:
        raise LensspaceError(f"unknown bootstrap method '{method}': use {', '.join(METHODS)}")
    constant = (x - m.unsqueeze(1)).abs().amax(dim=1) == 0
    return torch.where(constant, m, lo), torch.where(constant, m, hi)


def bootstrap_interval(
    per_seq: torch.Tensor,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    method: Method = DEFAULT_METHOD,
) -> tuple[float, float]:
    """Equal-tailed ``level`` interval for the mean of per-sequence values [n_seq] (see
    ``bootstrap_intervals`` for the methods)."""
    lo, hi = bootstrap_intervals(sequence_means(per_seq).unsqueeze(0), n_boot, seed, level, method)
    return float(lo[0]), float(hi[0])


def _bca_levels(x: torch.Tensor, m_star: torch.Tensor, alpha: float) -> torch.Tensor:
    """BCa's adjusted percentile levels [R, 2] for the mean: bias ``z0`` from the share of
    resample means below the observed one, acceleration from the jackknife (``skew / (6 sqrt
    n)``)."""
    m = x.mean(dim=1, keepdim=True)
    below = (m_star < m).double().mean(dim=1) + 0.5 * (m_star == m).double().mean(dim=1)
    z0 = torch.special.ndtri(below.clamp(1e-12, 1 - 1e-12)).unsqueeze(1)
    d = x - m  # jackknife: theta_bar - theta_(i) = d_i / (n - 1)
    accel = (
        (d.pow(3).sum(dim=1) / (6 * d.square().sum(dim=1).pow(1.5))).nan_to_num(0.0).unsqueeze(1)
    )
    z = torch.special.ndtri(torch.tensor([[alpha, 1 - alpha]], dtype=torch.float64))
    return torch.special.ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z)))


def ratio_interval(
    a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, level: float = 0.95
) -> tuple[float, float]:
    """Bootstrap-t interval of ``sum(a) / sum(b)`` from per-sequence totals ``a``, ``b`` [n] and
    resample counts [n_boot, n] (:func:`resample_counts`). The ratio's standard error is the
    delta method's, from the residuals ``a - ratio * b``, in the sample and in every resample.
    At 16 sequences with lognormal ``b`` and gamma noise, it covers 0.90-0.94 where the percentile
    interval covers 0.88-0.91 (``tests/test_nodes.py`` keeps a check)."""
    a, b = a.double(), b.double()
    n = a.shape[-1]

    def estimate(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total_b = weights @ b
        ratio = (weights @ a) / total_b
        resid = a - ratio[:, None] * b
        mean = (weights * resid).sum(-1) / n
        var = ((weights * resid.square()).sum(-1) / n - mean.square()).clamp_min(0) * n / (n - 1)
        return ratio, (var / n).sqrt() / (total_b / n)

    ratio, se = estimate(torch.ones(1, n, dtype=torch.float64))
    ratios, ses = estimate(counts.double())
    t = (ratios - ratio) / ses.clamp_min(1e-12 * float(se.clamp_min(1e-300)))
    alpha = (1 - level) / 2
    q_lo, q_hi = torch.quantile(t, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(ratio - q_hi * se), float(ratio - q_lo * se)


def bootstrap_mean(
    values: torch.Tensor,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: Method = DEFAULT_METHOD,
    floor: float | None = 0.0,
) -> Estimate:
    """Mean over all entries of ``values`` [n_sequences, n_positions]; interval over sequences.

    Every sequence has the same number of evaluated positions, so the token mean is the mean
    of sequence means and the bootstrap resamples those (``[n_sequences]`` is accepted as
    per-sequence values directly). The values here are KLs, never negative: the interval's
    lower end is kept at or above ``floor`` (a studentized interval of a few very skewed
    sequences can reach below 0); ``None`` keeps it as computed.
    """
    values = torch.as_tensor(values)
    per_seq = sequence_means(values)
    lo, hi = bootstrap_interval(per_seq, n_boot, seed, level, method)
    lo = max(float(lo), floor) if floor is not None else float(lo)
    return Estimate(
        float(per_seq.mean()), lo, float(hi), int(values.numel()), per_seq.numel(), method
    )


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of two measurements on the same sequences: ``a - b``.

    ``lo``/``hi``: studentized bootstrap interval of the mean difference over sequences;
    ``p_value``: two-sided bootstrap-t test of "mean difference = 0", consistent with the
    interval (p < 1 - level exactly when 0 lies outside it, up to resampling resolution);
    it cannot go below ``min_p`` = 2 / (n_boot + 1).
    """

    mean_a: float
    mean_b: float
    diff: float
    lo: float
    hi: float
    p_value: float
    n_sequences: int
    n_boot: int
    method: str = "studentized"

    @property
    def min_p(self) -> float:
        return 2 / (self.n_boot + 1)


def paired_difference(
    a: torch.Tensor, b: torch.Tensor, n_boot: int = 20000, seed: int = 0, level: float = 0.95
) -> Comparison:
    """Mean of ``a - b`` over the same sequences ([n_seq] or [n_seq, n_pos], reduced to sequence
    means) with its bootstrap-t interval and two-sided p-value.

    The p-value is the equal-tailed bootstrap-t tail share: with ``t = diff / se`` and the
    resamples' ``t* = (m* - diff) / se*`` (centred at the observed mean, i.e. resampled under the
    null's shape), ``p = 2 min(1 + #{t* >= t}, 1 + #{t* <= t}) / (n_boot + 1)``, capped at 1.
    Many resamples (default 20,000, min p 1e-4) keep it fine enough for a Holm or BH correction
    over a few hundred cells; the matrix form makes that cheap.
    """
    xa, xb = sequence_means(a), sequence_means(b)
    if xa.shape != xb.shape:
        raise LensspaceError(
            f"paired values need the same sequences: {tuple(xa.shape)} vs {tuple(xb.shape)}"
        )
    d = xa - xb
    n = d.numel()
    if n < 2:
        raise LensspaceError(f"a paired comparison needs at least 2 sequences, got {n}")
    diff = float(d.mean())
    alpha = (1 - level) / 2
    if float((d - diff).abs().max()) == 0:  # every sequence differs by the same amount
        p = 1.0 if diff == 0 else 2 / (n_boot + 1)
        return Comparison(float(xa.mean()), float(xb.mean()), diff, diff, diff, p, n, n_boot)
    se_row, t_row = _studentized(d.unsqueeze(0), resample_counts(n, n_boot, seed))
    se, t_star = float(se_row[0]), t_row[0]
    q_lo, q_hi = torch.quantile(
        t_star, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)
    ).tolist()
    t_obs = diff / se
    tail = min(int((t_star >= t_obs).sum()), int((t_star <= t_obs).sum())) + 1
    p = min(1.0, 2 * tail / (n_boot + 1))
    return Comparison(
        float(xa.mean()), float(xb.mean()), diff, diff - q_hi * se, diff - q_lo * se, p, n, n_boot
    )


def matched_permutation_p(
    candidate: torch.Tensor, draws: torch.Tensor, n_resamples: int = 20000, seed: int = 0
) -> float:
    """Two-sided p-value of "the candidate acts like its matched draws", for the statistic
    ``T = mean over sequences of (candidate - mean of the m draws)``.

    Under the null the m + 1 values of each sequence (candidate [n_seq] or [n_seq, n_pos], draws
    [m, n_seq(, n_pos)]) are exchangeable, so which of them is the candidate is a uniform label
    drawn independently per sequence. ``n_resamples`` seeded relabellings give ``T*`` and
    ``p = (1 + #{|T*| >= |T|}) / (n_resamples + 1)``: valid at every level (ties counted,
    discrete values too), smallest value ``1 / (n_resamples + 1)``. A sign flip of ``T``'s
    per-sequence differences would test that they are symmetric, which a candidate acting like
    one draw does not give (its difference from the draws' mean is skewed when the values are).
    """
    x = torch.cat(
        [
            sequence_means(candidate).double().unsqueeze(0),
            torch.stack([sequence_means(d).double() for d in draws]),
        ]
    )  # [m + 1, n_seq]
    if not torch.isfinite(x).all():  # a NaN would never count as extreme: p would be its floor
        raise LensspaceError(
            "a matched permutation test needs finite values (NaN or inf in the effects)"
        )
    m, n = x.shape[0] - 1, x.shape[1]
    if m < 1 or n < 1:
        raise LensspaceError(
            f"a matched permutation test needs a draw and a sequence, got {m} and {n}"
        )
    total = x.sum(0)

    def statistic(picked: torch.Tensor) -> torch.Tensor:  # T for the picked values [..., n_seq]
        return (picked * (1 + 1 / m) - total / m).mean(-1)

    observed = float(statistic(x[0]).abs())
    tolerance = 1e-9 * float(x.abs().sum(0).mean())  # equal but for rounding counts as a tie
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, n_resamples, 2**14):
        size = min(2**14, n_resamples - start)
        labels = torch.randint(0, m + 1, (size, n), generator=gen)
        hits += int((statistic(x.gather(0, labels)).abs() >= observed - tolerance).sum())
    return (1 + hits) / (n_resamples + 1)


def sign_test_p(differences: torch.Tensor) -> float:
    """Two-sided exact sign test of "the median difference is 0": among the non-zero per-sequence
    differences, how unlikely so many of one sign are under Binomial(n, 1/2). Its size is at most
    the level at any number of sequences, for any continuous distribution of differences (zeros
    dropped, the test is conditional on their number); the smallest p is 2 / 2^n."""
    d = differences.double().flatten()
    if not torch.isfinite(d).all():
        raise LensspaceError("a sign test needs finite differences (NaN or inf in the values)")
    positive, negative = int((d > 0).sum()), int((d < 0).sum())
    n = positive + negative
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(positive, negative) + 1)) / 2**n
    return min(1.0, 2 * tail)


def adjust(p_values: Sequence[float] | torch.Tensor, method: Literal["holm", "bh"]) -> list[float]:
    """Multiplicity-adjusted p-values, in the input order.

    ``holm``: Holm's step-down, controls the family-wise error rate (reject where adjusted
    p <= alpha). ``bh``: Benjamini-Hochberg step-up, controls the false discovery rate.
    """
    p = torch.as_tensor(p_values, dtype=torch.float64).flatten()
    if p.isnan().any() or (p < 0).any() or (p > 1).any():
        raise LensspaceError("p-values must lie in [0, 1] (no NaN)")
    m = p.numel()
    if m == 0:
        return []
    order = torch.argsort(p, stable=True)
    ranked = p[order]
    rank = torch.arange(1, m + 1, dtype=torch.float64)
    if method == "holm":
        adjusted = torch.cummax((m - rank + 1) * ranked, dim=0).values
    elif method == "bh":
        adjusted = torch.flip(torch.cummin(torch.flip(m / rank * ranked, [0]), dim=0).values, [0])
    else:
        raise LensspaceError(f"unknown correction '{method}': use holm or bh")
    out = torch.empty(m, dtype=torch.float64)
    out[order] = adjusted.clamp_max(1.0)
    return out.tolist()


@dataclass(frozen=True)
class DrawSpread:
    """Several random draws (e.g. random subspaces) measured on the same sequences.

    ``estimate``: the mean over draws and sequences, its interval over sequences (each
    sequence's values averaged over draws, then sequences resampled). ``draw_sd`` /
    ``draw_min`` / ``draw_max``: spread of the draws' own means (sd is NaN for one draw).
    """

    estimate: Estimate
    draw_sd: float
    draw_min: float
    draw_max: float
    n_draws: int


def draw_spread(
    values: torch.Tensor,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    method: Method = DEFAULT_METHOD,
) -> DrawSpread:
    """``values`` [n_draws, n_seq] or [n_draws, n_seq, n_pos]: the draw-mean with an interval
    over sequences (paired across draws), plus how much the draws themselves differ."""
    values = torch.as_tensor(values).double()
    if values.dim() not in (2, 3):
        raise LensspaceError(f"expected [n_draws, n_seq(, n_pos)], got shape {tuple(values.shape)}")
    per_draw = values.mean(dim=2) if values.dim() == 3 else values  # [n_draws, n_seq]
    draw_means = per_draw.mean(dim=1)
    est = bootstrap_mean(per_draw.mean(dim=0), n_boot, seed, level, method)
    est = Estimate(est.mean, est.lo, est.hi, int(values[0].numel()), est.n_sequences, est.method)
    sd = float(draw_means.std()) if len(draw_means) > 1 else math.nan
    return DrawSpread(est, sd, float(draw_means.min()), float(draw_means.max()), len(draw_means))
