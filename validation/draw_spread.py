"""Do the random draws of a finished run differ from one another by more than the sequences' noise?

    .venv/bin/python validation/draw_spread.py [--results results] [--run smollm2-bible] \
        [--family 72]

Each random draw is one subspace used on every held-out sequence. Per random cell of H0, H1 and
H2 (``per_sequence.tsv``) it tests each draw against the cell's other draws with the per-sequence
relabelling test (``stats.matched_permutation_p``), a comparison whose null ("this draw acts like
the others") is true by construction if the draws differ only by sequence noise, and prints how
often p falls below 0.05 / family, and the spread of the draws' means over what the per-sequence
residual noise implies (1 where draws differ by noise alone). Many small p-values mean that a test
over sequences compares a subspace with these draws, not with random subspaces in general.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import torch

from lensspace.stats import matched_permutation_p

CELL = ["basis", "layer", "k", "mode", "site"]


def draw_checks(
    per_sequence: pd.DataFrame, family: int, resamples: int
) -> tuple[int, int, list[float]]:
    """(draws below 0.05 / family, draws tested, per cell: spread of draw means / residual
    noise)."""
    below, tested, ratios = 0, 0, []
    for _, part in per_sequence[per_sequence["subspace"] == "random"].groupby(CELL):
        x = torch.tensor(
            part.pivot(index="draw", columns="sequence", values="kl").to_numpy(),
            dtype=torch.float64,
        )
        if len(x) < 2:
            continue
        residual = x - x.mean(0, keepdim=True) - x.mean(1, keepdim=True) + x.mean()
        ratios.append(float(x.mean(1).std() / (residual.std() / x.shape[1] ** 0.5)))
        for j in range(len(x)):
            p = matched_permutation_p(x[j], torch.cat([x[:j], x[j + 1 :]]), resamples, seed=j)
            tested += 1
            below += p <= 0.05 / family
    return below, tested, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--run", default="smollm2-bible")
    parser.add_argument(
        "--family", type=int, default=72, help="Holm family size whose first threshold is used"
    )
    args = parser.parse_args()
    resamples = max(20000, round(8 * args.family / 0.05))
    for experiment in ("h0", "h1", "h2"):
        path = args.results / args.run / experiment / "per_sequence.tsv"
        if not path.exists():
            print(f"{experiment}: no {path}")
            continue
        below, tested, ratios = draw_checks(pd.read_csv(path, sep="\t"), args.family, resamples)
        if not ratios:
            print(f"{experiment}: no random cell with two or more draws")
            continue
        print(
            f"{experiment}: draw against the other draws, p <= 0.05/{args.family} for {below} of "
            f"{tested} draws; "
            "spread of the draws' means / per-sequence noise: median "
            f"{statistics.median(ratios):.1f}, "
            f"range {min(ratios):.1f}-{max(ratios):.1f} over {len(ratios)} cells"
        )


if __name__ == "__main__":
    main()
