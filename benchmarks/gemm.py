"""CPU float32 products: torch's default BLAS against oneDNN (lensspace.gemm), side by side.

    .venv/bin/python benchmarks/gemm.py [--tokens 512] [--repeats 5] [--threads 2]

Alternating in one process, per shape: the default model's linear layers at ``--tokens`` rows
(attention's q/o and k/v, the MLP's gate/up and down), the unembedding (forward, and the input
gradient the refinements need), and 2048^3; then one forward of the prepared default model
(``resources/models/smollm2-135m``, from the README's main command) over 4 x 128 tokens with its
linear layers routed and not. Prints GFLOP/s of both and their ratio (oneDNN / default), and
the products' largest error against float64 relative to ``|x||W|``. Runs with the allocator
setting the workflow gives its jobs (huge pages; the script restarts itself with it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from roofline import median_seconds
from torch.nn import functional as F

from lensspace import gemm
from lensspace.malloc import ask_for_huge_pages

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "resources" / "models" / "smollm2-135m"


def relative_error(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    want = x.double() @ weight.double().T
    return float(((got.double() - want) / (x.double().abs() @ weight.double().abs().T)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if os.environ.get("GLIBC_TUNABLES") != ask_for_huge_pages():
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(args.threads)
    if not gemm.active():
        raise SystemExit("this PyTorch has no oneDNN linear: nothing to compare")
    m = args.tokens
    shapes = {
        "q, o [576x576]": (m, 576, 576),
        "k, v [192x576]": (m, 576, 192),
        "gate, up [1536x576]": (m, 576, 1536),
        "down [576x1536]": (m, 1536, 576),
        "unembedding [49152x576]": (m, 576, 49152),
        "2048^3": (2048, 2048, 2048),
    }
    gen = torch.Generator().manual_seed(0)
    warm_x, warm_w = torch.randn(m, 576, generator=gen), torch.randn(576, 576, generator=gen)
    for _ in range(20):  # both libraries' thread pools and code paths up before any timing
        F.linear(warm_x, warm_w), gemm.linear(warm_x, warm_w)
    print(
        f"{'product':34s} {'default':>9s} {'oneDNN':>9s} {'ratio':>6s}  {'error default':>13s} "
        f"{'oneDNN':>9s}"
    )
    for name, (rows, k, n) in shapes.items():
        x, weight = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
        flop = 2 * rows * k * n / 1e9
        default, onednn = (
            median_seconds(lambda: F.linear(x, weight), args.repeats),
            median_seconds(lambda: gemm.linear(x, weight), args.repeats),
        )
        print(
            f"{name:34s} {flop / default:9.0f} {flop / onednn:9.0f} {default / onednn:6.2f}  "
            f"{relative_error(F.linear(x, weight), x, weight):13.1e} "
            f"{relative_error(gemm.linear(x, weight), x, weight):9.1e}"
        )
        if n == 49152:  # the refinements' input gradient through the frozen head: g W
            g = torch.randn(rows, n, generator=gen)
            default = median_seconds(lambda: g @ weight, args.repeats)
            onednn = median_seconds(lambda: gemm.linear(g, weight.t()), args.repeats)
            print(
                f"{'unembedding, input gradient':34s} {flop / default:9.0f} {flop / onednn:9.0f} "
                f"{default / onednn:6.2f}"
            )
    print("(GFLOP/s, median of", args.repeats, "; error: largest |got - float64| / (|x||W|))")
    if not (MODEL / "lensspace-model.json").exists():
        print(f"no prepared model at {MODEL}: run the README's main command for the model forward")
        return
    from lensspace.adapter import Adapter
    from lensspace.models import load_model
    from lensspace.runner import BlockRunner

    model, _ = load_model(MODEL)
    adapter = Adapter(gemm.route_linears(model))
    runner = BlockRunner(adapter)
    h = torch.randint(0, adapter.unembedding.shape[0], (4, 128), generator=gen)
    with torch.no_grad():
        start = adapter.embed(h)

        def forward() -> torch.Tensor:
            return adapter.logits(runner.run(start, start=0))

        times = {}
        for flag in (False, True, False, True):
            gemm.enable(flag)
            times.setdefault(flag, []).append(median_seconds(forward, max(1, args.repeats // 2)))
    default, onednn = min(times[False]), min(times[True])
    print(
        f"default model, one forward of 4 x 128 tokens: default {default:.3f} s, oneDNN "
        f"{onednn:.3f} s, "
        f"ratio {default / onednn:.2f}"
    )


if __name__ == "__main__":
    main()
