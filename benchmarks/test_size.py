"""Size of the paired tests, at the levels a Holm correction asks for: how often each rejects a
true null, side by side on the same draws.

    .venv/bin/python benchmarks/test_size.py [--n 16] [--sigma 0.62] [--sims 2000] [--family 27 264]

Two nulls of per-sequence values, n sequences each:
- ``skewed``: differences from a centred lognormal (sigma 0.62: skewness 2.4, as measured on
  real per-sequence KLs), a true "mean difference = 0" that the bootstrap-t test
  (stats.paired_difference, the H0/H1/H2, lens-quality and OOD verdicts) is built for;
- ``exchangeable``: a and b drawn alike within each sequence (lognormal, sigma 1.2), the null of
  "ablating A does nothing that ablating B does not", under which the sign-flip test
  (stats.sign_flip_p, the neuron verdicts) is exact.
A valid test rejects at most alpha of the time. --family lists Holm family sizes m whose first
threshold 0.05 / m is also checked. The sign-flip test is not run on ``skewed``: a skewed
difference is not exchangeable, so rejecting it is that test's right answer, not an error.
"""

from __future__ import annotations

import argparse
import math

import torch

from lensspace.stats import paired_difference, sign_flip_p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--sigma", type=float, default=0.62)
    parser.add_argument("--sims", type=int, default=2000)
    parser.add_argument("--resamples", type=int, default=20000)
    parser.add_argument("--family", type=int, nargs="*", default=[27, 264])
    args = parser.parse_args()
    levels = [0.05, 0.01, *(0.05 / m for m in args.family)]
    gen = torch.Generator().manual_seed(0)
    tests = {"bootstrap-t": lambda a, b, sim: paired_difference(a, b, args.resamples, sim).p_value,
             "sign-flip": lambda a, b, sim: sign_flip_p(a, b, args.resamples, sim)}
    for null in ("skewed", "exchangeable"):
        rejections = {(name, level): 0 for name in tests for level in levels}
        for sim in range(args.sims):
            if null == "skewed":
                x = torch.randn(args.n, generator=gen, dtype=torch.float64).mul(args.sigma).exp()
                a, b = x - math.exp(args.sigma ** 2 / 2), torch.zeros(args.n, dtype=torch.float64)
            else:
                a, b = torch.randn(2, args.n, generator=gen, dtype=torch.float64).mul(1.2).exp()
            for name, test in tests.items():
                if null == "skewed" and name == "sign-flip":
                    continue
                p = test(a, b, sim)
                for level in levels:
                    rejections[name, level] += p <= level
        for name in tests:
            if null == "skewed" and name == "sign-flip":
                continue
            for level in levels:
                rate = rejections[name, level] / args.sims
                print(f"{null} null, n={args.n}, {name}: rejects {rate:.4f} at alpha {level:.5f} "
                      f"(ratio {rate / level:.2f})")


if __name__ == "__main__":
    main()
