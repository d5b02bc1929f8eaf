"""Size of the paired tests, at the levels a Holm correction asks for: how often each rejects a
true null, side by side on the same draws.

    .venv/bin/python validation/test_size.py [--n 32] [--draws 8] [--sigma 0.62] [--sims 2000] \
        [--family 27 264]

Two nulls of per-sequence values, n sequences each (the defaults: the embedded default's sample):
- ``skewed``: differences from a centred lognormal (sigma 0.62: skewness 2.4, as measured on
  real per-sequence KLs), a true "mean difference = 0" that the bootstrap-t test
  (stats.paired_difference, the H0/H1/H2, lens-quality and OOD verdicts) is built for, beside
  a sign flip of the differences (matched_permutation_p with one draw of zeros), which tests
  that they are symmetric rather than that their mean is 0;
- ``matched``: a fixed condition and its ``--draws`` random draws drawn alike in each sequence
  (lognormal, sigma 1.2: heavy tails), "the condition acts like its draws"; the bootstrap-t test
  of the condition minus the draws' mean beside the matched permutation test
  (stats.matched_permutation_p), which relabels the condition and its draws per sequence.
A valid test rejects at most alpha of the time. --family lists Holm family sizes m whose first
threshold 0.05 / m is also checked.
"""

from __future__ import annotations

import argparse
import math

import torch

from lensspace.stats import matched_permutation_p, paired_difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, default=32, help="held-out sequences (data.eval_sequences)"
    )
    parser.add_argument(
        "--draws", type=int, default=8, help="matched draws per candidate (random_draws)"
    )
    parser.add_argument("--sigma", type=float, default=0.62)
    parser.add_argument("--sims", type=int, default=2000)
    parser.add_argument("--resamples", type=int, default=20000)
    parser.add_argument("--family", type=int, nargs="*", default=[27, 264])
    args = parser.parse_args()
    if args.draws < 1 or args.n < 2:
        parser.error("--draws must be at least 1 and --n at least 2")
    levels = [0.05, 0.01, *(0.05 / m for m in args.family)]
    gen = torch.Generator().manual_seed(0)

    def permutation(x, sim):  # with one row of zeros beside the first: a sign flip of its values
        return matched_permutation_p(x[0], x[1:], args.resamples, sim)

    tests = {
        "bootstrap-t": lambda x, sim: (
            paired_difference(x[0], x[1:].mean(0), args.resamples, sim).p_value
        ),
        "matched permutation": permutation,
        "sign flip": permutation,
    }
    for null in ("skewed", "matched"):
        names = (
            ["bootstrap-t", "sign flip"]
            if null == "skewed"
            else ["bootstrap-t", "matched permutation"]
        )
        rejections = {(name, level): 0 for name in names for level in levels}
        for sim in range(args.sims):
            if null == "skewed":  # one difference per sequence against zero
                d = torch.randn(args.n, generator=gen, dtype=torch.float64).mul(args.sigma).exp()
                x = torch.stack([d - math.exp(args.sigma**2 / 2), torch.zeros_like(d)])
            else:
                x = (
                    torch.randn(1 + args.draws, args.n, generator=gen, dtype=torch.float64)
                    .mul(1.2)
                    .exp()
                )
            for name in names:
                p = tests[name](x, sim)
                for level in levels:
                    rejections[name, level] += p <= level
        for name in names:
            for level in levels:
                rate = rejections[name, level] / args.sims
                draws = f", draws={args.draws}" if null == "matched" else ""
                print(
                    f"{null} null, n={args.n}{draws}, {name}: rejects {rate:.4f} at alpha "
                    f"{level:.5f} "
                    f"(ratio {rate / level:.2f})"
                )


if __name__ == "__main__":
    main()
