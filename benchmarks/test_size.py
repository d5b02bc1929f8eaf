"""Size of the paired bootstrap-t test (stats.paired_difference) under a skewed null, at the
levels a Holm correction asks for: how often it rejects a true "mean difference = 0".

    .venv/bin/python benchmarks/test_size.py [--n 16] [--sigma 0.62] [--sims 2000] [--family 27 264]

Per-sequence differences are drawn from a centred lognormal (sigma 0.62: skewness 2.4, as
measured on real per-sequence KLs); a valid test rejects at most alpha of the time. --family
lists Holm family sizes m whose first threshold 0.05 / m is also checked.
"""

from __future__ import annotations

import argparse
import math

import torch

from lensspace.stats import paired_difference


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
    rejections = {level: 0 for level in levels}
    for sim in range(args.sims):
        x = torch.randn(args.n, generator=gen, dtype=torch.float64).mul(args.sigma).exp()
        d = x - math.exp(args.sigma ** 2 / 2)
        p = paired_difference(d, torch.zeros_like(d), args.resamples, sim).p_value
        for level in levels:
            rejections[level] += p < level
    for level in levels:
        rate = rejections[level] / args.sims
        print(f"n={args.n} sigma={args.sigma}: rejects {rate:.4f} at alpha {level:.5f} (ratio {rate / level:.2f})")


if __name__ == "__main__":
    main()
