"""Report the embedded default's targets from a finished run: per-rule time and memory
(from the rules' benchmark: files), total wall time, peak memory, and lens quality.

    .venv/bin/python benchmarks/embedded_default.py [--results results] [--wall SECONDS]

--wall is the measured wall time of the whole `snakemake` command (e.g. from /usr/bin/time);
without it the sum of the rules' times is shown (a lower bound with 2 cores in use).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from lensspace.provenance import benchmark_jobs, per_rule

TARGET_PEAK_MB = 8000
# Stage targets, in seconds: the rules each stage needs, cumulatively (heavy rules take both
# cores, so their times add up); the whole run is also held against the measured wall time.
STAGES = {
    "through H0": (
        15 * 60,
        {
            "prepare_model",
            "prepare_corpus",
            "tokenize",
            "cache_activations",
            "train_lens",
            "fetch_lens",
            "eval_lens",
            "svd",
            "h0_layer",
        },
    ),
    "H0 and H1": (20 * 60, {"h1_layer", "h1_heads"}),
    "everything": (25 * 60, {"h2_layer", "ridge_lens", "shuffle_pairs", "shuffle_windows"}),
}
TARGET_LAST_LAYER_KL = 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--wall", type=float, default=None)
    args = parser.parse_args()
    jobs = benchmark_jobs(args.results)
    if jobs.empty:
        raise SystemExit(
            f"no benchmark files under {args.results}/benchmarks: run the workflow first"
        )
    print(per_rule(jobs).set_index("rule").round(1).to_string())
    total = jobs["s"].sum()
    wall = args.wall if args.wall is not None else total
    peak = jobs["max_rss_mb"].max()
    print(
        f"\nsum of benchmarked rule times: {total:.0f} s"
        + (f"; measured wall: {args.wall:.0f} s" if args.wall is not None else "")
    )
    rules: set[str] = set()
    for stage, (target, added) in STAGES.items():
        rules |= added
        spent = jobs[jobs["rule"].isin(rules)]["s"].sum()
        print(f"{stage}: heavy rules {spent:.0f} s / target {target} s = {spent / target:.2f}")
    print(
        f"whole run: {wall:.0f} s / target {STAGES['everything'][0]} s = "
        f"{wall / STAGES['everything'][0]:.2f}"
    )
    print(
        f"peak RSS of any job: {peak:.0f} MB; / target ({TARGET_PEAK_MB} MB): "
        f"{peak / TARGET_PEAK_MB:.2f}"
    )
    for lens_eval in sorted(args.results.glob("*/lens_eval.tsv")):
        frame = pd.read_csv(lens_eval, sep="\t")
        wide = frame.pivot(index="layer", columns="lens", values="kl")
        beats = (wide["tuned"] < wide["logit"]).all()
        last = wide["tuned"].iloc[-1]
        print(
            f"{lens_eval.parent.name}: tuned < logit at every layer: {beats}; "
            f"last-layer tuned KL {last:.3f} nats (target <= {TARGET_LAST_LAYER_KL}); "
            f"first-layer tuned {wide['tuned'].iloc[0]:.2f} vs logit {wide['logit'].iloc[0]:.2f}"
        )


if __name__ == "__main__":
    main()
