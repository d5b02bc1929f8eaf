"""The GPU's fp32 matrix-multiply rate (TF32 off), measured: the peak every heavy step is held to.

    .venv/bin/python benchmarks/gpu_matmul.py

Times square products and the unembedding's shape ([16 x 511 tokens, 768] x [768, 50257])
on the first CUDA device and prints GFLOP/s of each; exits with a message where no GPU is visible.
"""

from __future__ import annotations

import sys
import time

import torch

from lensspace.devices import configure_numerics, describe


def rate(m: int, k: int, n: int, repeats: int = 20) -> float:
    a = torch.randn(m, k, device="cuda")
    b = torch.randn(k, n, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * m * k * n * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible: nothing to measure")
    configure_numerics(allow_tf32=False)
    print(describe("cuda"))
    for shape in ((8192, 8192, 8192), (16 * 511, 768, 50257), (16 * 511, 768, 768)):
        print(f"fp32 matmul {shape}: {rate(*shape):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
