"""Bootstrap intervals, paired tests and multiplicity corrections of ``lensspace.stats``.

The coverage and size checks simulate samples shaped like the real per-sequence values
(measured with ``validation/coverage.py real``; numbers in ``REAL_SHAPE``), since on few
right-skewed sequences a percentile bootstrap covers far less often than it says.
"""

from __future__ import annotations

import math

import pytest
import torch

from lensspace.errors import LensspaceError
from lensspace.stats import (
    adjust,
    bootstrap_interval,
    bootstrap_intervals,
    bootstrap_mean,
    draw_spread,
    matched_permutation_p,
    paired_difference,
    sequence_means,
)

# ---------------------------------------------------------------- multiplicity corrections


def test_adjust_hand_computed():
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    # BH: times 4/1, 4/2, 4/3, 4/4 = 0.02, 0.02, 0.04, 0.04 -> running min from the largest
    p = [0.01, 0.04, 0.03, 0.005]
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust([0.5, 0.9], "holm") == pytest.approx([1.0, 1.0])
    assert adjust([], "bh") == []
    with pytest.raises(LensspaceError):
        adjust([0.1, float("nan")], "holm")
    with pytest.raises(LensspaceError):
        adjust([0.1], "bonferroni")


def _holm_rejects(p: list[float], alpha: float) -> set[int]:
    """Holm's procedure as stated: walk the sorted p-values, stop at the first one above
    alpha / (m - j) (j = 0, 1, ...), reject everything before it."""
    m = len(p)
    rejected = set()
    for j, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[i] > alpha / (m - j):
            break
        rejected.add(i)
    return rejected


def _bh_rejects(p: list[float], alpha: float) -> set[int]:
    """Benjamini-Hochberg as stated: the largest k with p_(k) <= k alpha / m; reject the k
    smallest."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    k = max((j + 1 for j, i in enumerate(order) if p[i] <= (j + 1) * alpha / m), default=0)
    return set(order[:k])


@pytest.mark.parametrize("method,rejects", [("holm", _holm_rejects), ("bh", _bh_rejects)])
def test_adjust_matches_brute_force(method, rejects):
    """An adjusted p-value is the smallest level at which the procedure rejects that hypothesis:
    check it against running the procedure itself at every level where a decision can change."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        m = int(torch.randint(1, 12, (1,), generator=gen))
        p = (torch.rand(m, generator=gen) ** 3).tolist()
        if trial % 4 == 0 and m > 2:  # ties
            p[1] = p[0]
        adjusted = adjust(p, method)
        factors = {m / j for j in range(1, m + 1)} | set(range(1, m + 1))
        # a hair above each candidate, so float rounding in the procedure cannot flip a decision
        levels = sorted({min(1.0, c * x) * (1 + 1e-9) for x in p for c in factors} | {1.0})
        for i in range(m):
            smallest = min((a for a in levels if i in rejects(p, a)), default=1.0)
            assert adjusted[i] == pytest.approx(min(smallest, 1.0), rel=1e-8), (p, i)


# ---------------------------------------------------------------- basic behaviour


def test_bootstrap_mean_shapes_and_degenerate_cases():
    values = torch.rand(12, 7, generator=torch.Generator().manual_seed(1))
    est = bootstrap_mean(values, n_boot=500, seed=2)
    assert est == bootstrap_mean(values, n_boot=500, seed=2)
    assert est.mean == pytest.approx(float(values.double().mean()))
    assert (est.n_tokens, est.n_sequences, est.method) == (84, 12, "studentized")
    assert est.lo < est.mean < est.hi
    per_seq = bootstrap_mean(values.double().mean(1), n_boot=500, seed=2)
    assert (per_seq.mean, per_seq.lo, per_seq.hi) == pytest.approx((est.mean, est.lo, est.hi))
    for method in ("studentized", "bca", "percentile"):
        lo, hi = bootstrap_interval(torch.full((6,), 1.5), n_boot=50, seed=0, method=method)
        assert lo == hi == 1.5
    with pytest.raises(LensspaceError):
        bootstrap_interval(torch.ones(1), n_boot=10, seed=0)
    with pytest.raises(LensspaceError):
        sequence_means(torch.ones(2, 3, 4))


def test_paired_difference_reduces_and_pairs():
    gen = torch.Generator().manual_seed(3)
    shared = torch.randn(16, 1, generator=gen, dtype=torch.float64) * 10  # a large sequence effect
    a = shared + torch.randn(16, 20, generator=gen, dtype=torch.float64) * 0.1 + 0.3
    b = shared + torch.randn(16, 20, generator=gen, dtype=torch.float64) * 0.1
    cmp = paired_difference(a, b, n_boot=4000, seed=0)
    assert cmp.diff == pytest.approx(float(a.mean() - b.mean()))
    assert (cmp.mean_a, cmp.mean_b) == pytest.approx((float(a.mean()), float(b.mean())))
    # pairing removes the shared sequence effect: the difference is clear, the marginals overlap
    assert 0 < cmp.lo < 0.3 < cmp.hi < 0.6 and cmp.p_value == pytest.approx(cmp.min_p)
    ea, eb = bootstrap_mean(a, 4000, 0, floor=None), bootstrap_mean(b, 4000, 0, floor=None)
    assert ea.lo < eb.hi
    assert paired_difference(a, a, n_boot=100).p_value == 1.0
    with pytest.raises(LensspaceError):
        paired_difference(a, b[:8])


def test_p_value_agrees_with_interval():
    """p < 0.05 exactly when 0 lies outside the 95% interval (away from resampling noise)."""
    gen = torch.Generator().manual_seed(4)
    checked = 0
    for _ in range(150):
        d = (
            torch.randn(12, generator=gen, dtype=torch.float64).mul(0.8).exp()
            - 1.3
            + torch.rand(1, generator=gen)
        )
        cmp = paired_difference(d, torch.zeros(12), n_boot=2000, seed=checked)
        if abs(cmp.p_value - 0.05) > 0.01:
            assert (cmp.p_value < 0.05) == (not cmp.lo <= 0 <= cmp.hi), cmp
            checked += 1
    assert checked > 100


def test_draw_spread():
    gen = torch.Generator().manual_seed(5)
    values = torch.rand(4, 10, 6, generator=gen, dtype=torch.float64) + torch.arange(4.0).view(
        4, 1, 1
    )
    spread = draw_spread(values, n_boot=500, seed=1)
    draw_means = values.mean((1, 2))
    assert spread.n_draws == 4
    assert spread.estimate.mean == pytest.approx(float(values.mean()))
    assert (spread.draw_sd, spread.draw_min, spread.draw_max) == pytest.approx(
        (float(draw_means.std()), float(draw_means.min()), float(draw_means.max()))
    )
    # the interval is over sequences of the draw-averaged values: the draws' offsets cancel
    expected = bootstrap_mean(values.mean((0, 2)), n_boot=500, seed=1)
    assert (spread.estimate.lo, spread.estimate.hi) == pytest.approx((expected.lo, expected.hi))
    assert spread.estimate.hi - spread.estimate.lo < spread.draw_max - spread.draw_min
    assert math.isnan(draw_spread(values[:1], n_boot=50).draw_sd)


# ------------------------------------------------------- coverage, size and power by simulation
#
# The real shape (validation/coverage.py real): per-sequence mean KLs of H0-style lens-space
# ablations (top / bottom / random 288 directions of W_U, zero and mean, pre-norm) on the real
# default model (SmolLM2-135M, WEB bible, 128 held-out sequences of 128 tokens, least-squares
# lens fitted on 64 others), layers 3, 6, 12, 18, 24. Per-ablation values: coefficient of
# variation 0.06-0.24, sd of the log 0.06-0.23, skewness up to 2.36 (random, mean ablation,
# layer 6; mean ablations 1.0-2.4, zero ablations -0.3-0.9), kurtosis 9-10 in the most skewed
# cells (a few outlying sequences). Paired differences of two ablations: |skewness| up to 1.84
# (random - internal, mean, layer 18). The families below match the largest skewness: a
# lognormal with sigma 0.62 (skewness 2.36) for per-sequence values, a centred lognormal with
# skewness 1.84 for differences. (Drawing sequences from the 128 real values themselves is
# harsher, because the skew sits in a few outliers: see validation/coverage.py simulate.)
LOG_SD = 0.62
DIFF_SKEW = 1.84


def _lognormal(shape: tuple[int, ...], sigma: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).mul(sigma).exp()


@pytest.mark.parametrize("n,minimum", [(8, 0.92), (16, 0.93), (32, 0.93)])
def test_interval_coverage_on_skewed_sequences(n, minimum):
    """The default interval covers the true mean >= 0.93 of the time at n = 16 and 32 (>= 0.92
    at n = 8) under lognormal per-sequence values with the real spread; the percentile bootstrap
    (the old default) does not."""
    reps = 4000
    x = _lognormal((reps, n), LOG_SD, torch.Generator().manual_seed(n))
    truth = math.exp(LOG_SD**2 / 2)
    lo, hi = bootstrap_intervals(x, n_boot=1000, seed=1)
    covered = float(((lo <= truth) & (truth <= hi)).double().mean())
    assert covered >= minimum, covered
    p_lo, p_hi = bootstrap_intervals(x, n_boot=1000, seed=1, method="percentile")
    assert float(((p_lo <= truth) & (truth <= p_hi)).double().mean()) < covered - 0.02
    # bootstrap_mean (what the experiments call) is one row of the same computation
    for row in range(3):
        est = bootstrap_mean(x[row].unsqueeze(1).expand(n, 4), n_boot=1000, seed=1)
        assert (est.lo, est.hi) == pytest.approx((float(lo[row]), float(hi[row])))


def _skewed_differences(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Mean-zero, unit-sd differences with skewness DIFF_SKEW (a centred, scaled lognormal)."""
    sigma = _lognormal_sigma_for_skew(DIFF_SKEW)
    raw = _lognormal(shape, sigma, gen) - math.exp(sigma**2 / 2)
    return raw / math.sqrt((math.exp(sigma**2) - 1) * math.exp(sigma**2))


def _lognormal_sigma_for_skew(skew: float) -> float:
    """The lognormal sigma whose skewness (e^s2 + 2) sqrt(e^s2 - 1) equals ``skew`` (bisection)."""
    lo, hi = 1e-6, 3.0
    for _ in range(100):
        mid = (lo + hi) / 2
        s2 = math.exp(mid**2)
        lo, hi = (mid, hi) if (s2 + 2) * math.sqrt(s2 - 1) < skew else (lo, mid)
    return lo


@pytest.mark.parametrize("n", [16, 32])
def test_paired_test_size_coverage_and_power(n):
    """Under a null of skewed mean-zero per-sequence differences (n = 16, and the default's 32)
    the test rejects at 0.05 no more than ~6% of the time, so its interval covers >= 0.94; a
    clear effect (1.5 sd) is found nearly always, and a strong one reaches p-values a Holm
    correction over 300 cells can use (< 0.05 / 300)."""
    reps = 2000
    gen = torch.Generator().manual_seed(6 + n)
    null = _skewed_differences((reps, n), gen)
    zeros = torch.zeros(n)
    rejected = covered = 0
    for rep in range(reps):
        cmp = paired_difference(null[rep], zeros, n_boot=1000, seed=rep)
        rejected += cmp.p_value < 0.05
        covered += cmp.lo <= 0 <= cmp.hi
    assert rejected / reps <= 0.06
    assert covered / reps >= 0.94
    effect = _skewed_differences((200, n), gen) + 1.5
    power = sum(
        paired_difference(effect[rep], zeros, n_boot=1000, seed=rep).p_value < 0.05
        for rep in range(200)
    )
    assert power / 200 >= 0.95
    strong = _skewed_differences((20, n), gen) + 3.0
    p = [paired_difference(strong[rep], zeros, seed=rep).p_value for rep in range(20)]
    assert sorted(p)[10] < 0.05 / 300


def test_matched_permutation_p_against_every_labelling_by_hand():
    """With many resamples the p-value approaches the exact one: the share of all (m + 1)^n
    labellings (which value of each sequence is the candidate's) whose |T| reaches the observed,
    counted here with itertools on integer values, where ties are common and must count."""
    import itertools

    gen = torch.Generator().manual_seed(8)
    values = torch.randint(0, 3, (3, 6), generator=gen).double()  # candidate + 2 draws, 6 sequences
    cand, draws = values[0], values[1:]

    def t(picked):  # mean over sequences of the picked value minus the mean of the others
        return sum(v - (col - v) / 2 for v, col in zip(picked, values.sum(0).tolist())) / 6

    observed = abs(t(cand.tolist()))
    exact = (
        sum(
            abs(t([values[c, i].item() for i, c in enumerate(labels)])) >= observed - 1e-12
            for labels in itertools.product(range(3), repeat=6)
        )
        / 3**6
    )
    assert 0.01 < exact < 0.5  # a case that tells ties dropped (0.003) and sign flips (0.09) apart
    p = matched_permutation_p(cand, draws, n_resamples=400000, seed=1)
    assert p == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 400000) + 1e-5)
    assert matched_permutation_p(cand, draws, 5000, seed=2) == matched_permutation_p(
        cand, draws, 5000, seed=2
    )
    same = torch.ones(6)
    assert (
        matched_permutation_p(same, torch.stack([same, same]), 999) == 1.0
    )  # every labelling ties
    far = (
        torch.arange(6.0) + 100
    )  # [n_seq, n_pos] candidate far above every draw: the floor 1 / (B + 1)
    assert matched_permutation_p(
        far.repeat(3, 1).T, torch.randn(4, 6, 3, generator=gen), 999
    ) == pytest.approx(1e-3)
    with pytest.raises(LensspaceError, match="finite"):
        matched_permutation_p(torch.tensor([1.0, float("nan")]), torch.ones(2, 2))


@pytest.mark.parametrize("n,m", [(16, 4), (32, 8)])  # 32 sequences and 8 draws: the default's
@pytest.mark.parametrize("kind", ["skewed", "discrete"])
def test_matched_permutation_size_at_holm_levels(kind, n, m):
    """Where the candidate acts like its m matched draws (the m + 1 values of each of n
    sequences drawn alike), the test rejects at most alpha of the time, at 0.05 and at Holm's
    first threshold for the neuron family (0.05 / 27): simulated with skewed lognormal effects,
    where the candidate-minus-draws-mean difference is itself skewed, and with shares of flipped
    top-1 tokens out of 127 (discrete, tied); a shift of two sd is still found."""
    reps, levels = 2000, (0.05, 0.05 / 27)
    gen = torch.Generator().manual_seed(11 + n)
    if kind == "skewed":
        x = (torch.randn(reps, m + 1, n, generator=gen, dtype=torch.float64) * 1.2).exp()
    else:
        rate = (
            torch.rand(reps, 1, n, 1, generator=gen, dtype=torch.float64) * 0.05
        )  # per-sequence rate
        x = (
            (torch.rand(reps, m + 1, n, 127, generator=gen, dtype=torch.float64) < rate)
            .double()
            .mean(-1)
        )
    p = torch.tensor([matched_permutation_p(x[r, 0], x[r, 1:], 4000, seed=r) for r in range(reps)])
    for level in levels:
        # valid: P(p <= level) <= level; the simulation's own error, 3 standard errors
        assert float((p <= level).double().mean()) <= level + 3 * math.sqrt(
            level * (1 - level) / reps
        )
    found = [
        matched_permutation_p(
            x[r, 0] + 2 * (x[r, 0] - x[r, 1:].mean(0)).std(), x[r, 1:], 4000, seed=r
        )
        for r in range(200)
    ]
    assert float((torch.tensor(found) < 0.05).double().mean()) >= 0.8


@pytest.mark.parametrize("fused_cpu", [True, False])
def test_kl_reference_matches_float64_and_is_zero_against_itself(fused_cpu, monkeypatch):
    """``kl`` and ``compare`` on both their paths (the compiled kernels: float64 differences and
    sums, float32 exp; and eager passes, ``kl``'s in place), against the float64 definition on
    logit-sized values."""
    from lensspace import fused
    from lensspace.divergences import KLReference, kl_from_logprobs

    for kernel in (fused.kl_sums, fused.kl_terms):
        monkeypatch.setattr(kernel, "enabled", fused_cpu)
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)  # also on this small vocabulary
    gen = torch.Generator().manual_seed(3)
    p_logits = (
        torch.randn(3, 5, 4000, generator=gen) * 6 + 40
    )  # logit-sized values, as a real head gives
    q_logits = p_logits + torch.randn(3, 5, 4000, generator=gen) * 0.05
    logp = p_logits.log_softmax(-1)
    reference = KLReference(logp)
    # the reference distribution is softmax(logp): float32 log-probabilities sum to 1 only to
    # about 1e-6
    exact = kl_from_logprobs(logp.double().log_softmax(-1), q_logits.double().log_softmax(-1))
    got = reference.kl(q_logits.clone())
    assert got.shape == exact.shape
    # measured: 8e-7 (eager: float32 terms, and weights exp(logp) that sum to 1 + 1e-6, on
    # log-probabilities of about -8); 5e-8 (fused: float64 differences, p normalised)
    assert torch.allclose(got.double(), exact, rtol=1e-4, atol=2e-6)
    assert float(reference.kl(p_logits.clone()).abs().max()) < 1e-6
    mine = q_logits.clone()
    reference.kl(mine)
    if not fused_cpu:
        assert not torch.equal(
            mine, q_logits
        )  # documented: the eager path consumes the logits in place
    if fused_cpu:  # the same loops on both sides: exactly 0 against its own log-probabilities
        assert float(reference.compare(logp.clone()).kl.abs().max()) == 0.0
        assert float(reference.kl(logp.clone()).abs().max()) == 0.0
        # the two kernels agree (their sums differ in order only)
        torch.testing.assert_close(
            reference.kl(q_logits.clone()),
            reference.compare(q_logits.clone()).kl,
            rtol=1e-6,
            atol=1e-9,
        )
    # a reference kept as logits: the same logits give 0 (exactly, fused), other logits the same KL
    from_logits = KLReference.from_logits(p_logits)
    same = from_logits.compare(p_logits.clone()).kl
    assert float(same.abs().max()) == 0.0 if fused_cpu else float(same.abs().max()) < 1e-6
    torch.testing.assert_close(
        from_logits.compare(q_logits.clone()).kl.double(),
        exact,
        rtol=1e-4,
        atol=2e-7 if fused_cpu else 2e-6,
    )
    compared = reference.compare(q_logits.clone())
    logq = q_logits.double().log_softmax(-1)
    torch.testing.assert_close(
        compared.kl.double(), exact, rtol=1e-4, atol=2e-7 if fused_cpu else 2e-6
    )
    torch.testing.assert_close(
        compared.entropy.double(), -(logq.exp() * logq).sum(-1), rtol=1e-6, atol=1e-6
    )
    assert torch.equal(compared.top1, q_logits.argmax(-1))


def test_kl_loss_value_and_gradient_equal_autograd_of_the_definition():
    """The training loss's closed-form gradient, ``(softmax(y) - p) / N``: torch's numerical
    gradient check in float64, and on logit-sized float32 values the value and gradient of autograd
    through the definition (mean of KL(p || softmax(y))), computed in float64."""
    from lensspace.divergences import kl_from_logprobs, kl_loss

    gen = torch.Generator().manual_seed(5)
    logp = (torch.randn(3, 4, 50, generator=gen, dtype=torch.float64) * 3).log_softmax(-1)
    p = logp.exp()
    y = (torch.randn(3, 4, 50, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kl_loss(x, p, (p * logp).sum(-1)), (y,))

    target = (torch.randn(64, 4000, generator=gen) * 6 + 40).log_softmax(-1)
    logits = (target.exp().log() + torch.randn(64, 4000, generator=gen) * 2 + 35).requires_grad_()
    p32 = target.exp()
    loss = kl_loss(logits, p32, torch.linalg.vecdot(p32, target))
    (grad,) = torch.autograd.grad(loss, logits)
    y64 = logits.detach().double().requires_grad_()
    exact = kl_from_logprobs(target.double(), y64.log_softmax(-1), p32.double()).mean()
    (exact_grad,) = torch.autograd.grad(exact, y64)
    assert abs(float(loss) - float(exact)) < 1e-5 * float(exact)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-9)
