"""Recompute a finished run's lens KL and seed-layout H0 cells independently (transformers and
tuned-lens only, from the contract files) and print the largest relative difference.

    .venv/bin/python validation/recompute.py [run] [--config config.yaml]
"""

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_recompute import compare_with_contract, recompute  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="smollm2-bible")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    run_dir = ROOT / "results" / args.run
    model_dir = ROOT / "resources" / "models" / config["runs"][args.run]["model"]
    both = compare_with_contract(
        run_dir, *recompute(run_dir, model_dir, config["cache"]["storage"])
    )
    print(both.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    print(
        f"largest relative difference: {both['rel_diff'].max():.2e} over {len(both)} numbers "
        "(target < 1e-4)"
    )


if __name__ == "__main__":
    main()
