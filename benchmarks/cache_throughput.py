"""Caching throughput against the model's bare forward pass, measured side by side.

    .venv/bin/python benchmarks/cache_throughput.py [--model resources/models/smollm2-135m]

Alternates the two on the same batches (real tokens from a finished run when present, else
seeded random ids) and prints tokens/s of each and their ratio (target: >= 0.9).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lensspace.activations import write_cache
from lensspace.adapter import Adapter
from lensspace.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("resources/models/smollm2-135m"))
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(args.model)
    adapter = Adapter(model)
    ids = torch.randint(
        0,
        len(tokenizer),
        (args.sequences, args.seq_len),
        generator=torch.Generator().manual_seed(0),
        dtype=torch.int32,
    )
    n_tokens = ids.numel()

    def bare() -> None:
        with torch.no_grad():
            for start in range(0, len(ids), args.batch_size):
                model(ids[start : start + args.batch_size].long(), use_cache=False)

    def cached(folder: Path) -> None:
        write_cache(adapter, {"eval": ids}, folder, {}, batch_size=args.batch_size)

    bare()  # warm-up
    times = {"bare forward": [], "cache to disk": []}
    out = Path("results/benchmarks/_cache_throughput")
    for _ in range(args.repeats):
        start = time.perf_counter()
        bare()
        times["bare forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        cached(out)
        times["cache to disk"].append(time.perf_counter() - start)
    rates = {name: n_tokens / sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    for name, rate in rates.items():
        print(f"{name:>14}: {rate:8.0f} tokens/s (median of {args.repeats})")
    print(
        f"ratio cache / bare: {rates['cache to disk'] / rates['bare forward']:.2f} (target >= 0.90)"
    )


if __name__ == "__main__":
    main()
