"""Coverage of the bootstrap intervals over sequences, and the shape of the real per-sequence
values they must cover.

    .venv/bin/python validation/coverage.py real --out /tmp/real.json   # about 15 min, 2 cores
    .venv/bin/python validation/coverage.py simulate --sigmas 0.62 --values /tmp/real.json \
        --keys L6/random/mean

``real`` builds a larger real cache of the embedded default's model (SmolLM2-135M on the WEB
bible), fits a least-squares tuned lens on its train split and reports, for H0-style lens-space
ablations (top / bottom / random 288 directions of ``W_U``, zero and mean, pre-norm), the shape
of the per-sequence mean KLs over held-out sequences -- skewness, coefficient of variation,
sd of the log -- and of the paired per-sequence differences of two ablations. It also writes the
per-sequence values to ``--out`` so ``simulate`` can draw samples from them.

``simulate`` measures, for each interval method of ``lensspace.stats`` and n = 8, 16, 32
sequences, how often the nominal 0.95 interval covers the true mean (and its mean width): under
lognormals of the given sigmas (0.62 matches the largest real skewness, 2.36) and, with
``--values``, drawing sequences from the measured real per-sequence values themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from lensspace.stats import METHODS, bootstrap_intervals

ROOT = Path(__file__).resolve().parents[1]


def shape(x: torch.Tensor) -> dict:
    """Mean, coefficient of variation, sample skewness; sd of the log where all are positive."""
    x = x.double()
    m, s = x.mean(), x.std()
    skew = ((x - m) ** 3).mean() / x.std(unbiased=False) ** 3
    out = {"mean": float(m), "sd": float(s), "cv": float(s / m.abs()), "skew": float(skew)}
    if bool((x > 0).all()):
        out["log_sd"] = float(x.log().std())
    return out


@torch.no_grad()
def measure_real(args) -> None:
    from lensspace.activations import ActivationCache, write_cache
    from lensspace.adapter import Adapter
    from lensspace.corpus import TokenSplit, read_documents, tokenize_documents
    from lensspace.divergences import kl_from_logprobs
    from lensspace.lenses import LensTraining, train_lens, translate
    from lensspace.models import load_model
    from lensspace.subspaces import ablate, select, unembedding_bases

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ROOT / "resources" / "models" / "smollm2-135m")
    adapter = Adapter(model)
    tokens = tokenize_documents(
        read_documents(ROOT / "resources" / "corpora" / "web-bible.txt"),
        tokenizer,
        TokenSplit(
            seq_len=128,
            train_sequences=args.train_sequences,
            eval_sequences=args.eval_sequences,
            seed=0,
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_cache(adapter, tokens, Path(tmp) / "cache", {}, storage="float16")
        cache = ActivationCache(Path(tmp) / "cache")
        lens = train_lens(adapter, cache, LensTraining(refine_steps=0), "smollm2-135m")
        print(f"cache + lens: {time.perf_counter() - started:.0f} s")
        basis = unembedding_bases(adapter)["unembed"].vectors
        k = adapter.d_model // 2
        qs = {
            "output": select(basis, "output", k),
            "internal": select(basis, "internal", k),
            "random": select(basis, "random", k, seed=k),
        }
        per_seq: dict[str, list[float]] = {}
        for layer in args.layers:
            mean = translate(lens, cache.load(layer, "train")[:, 1:], layer).mean((0, 1))
            h = cache.load(layer, "eval")
            for start in range(0, len(h), 4):
                z = translate(lens, h[start : start + 4, 1:], layer)
                clean = adapter.logits(z).log_softmax(-1)
                for (name, q), mode in (
                    (item, mode) for item in qs.items() for mode in ("zero", "mean")
                ):
                    kl = kl_from_logprobs(
                        clean, adapter.logits(ablate(z, q, mode, mean)).log_softmax(-1)
                    )
                    per_seq.setdefault(f"L{layer}/{name}/{mode}", []).extend(
                        kl.double().mean(1).tolist()
                    )
    values = {key: torch.tensor(v, dtype=torch.float64) for key, v in per_seq.items()}
    for layer in args.layers:
        for mode in ("zero", "mean"):
            get = lambda s: values[f"L{layer}/{s}/{mode}"]  # noqa: E731
            values[f"L{layer}/output-internal/{mode}"] = get("output") - get("internal")
            values[f"L{layer}/output-random/{mode}"] = get("output") - get("random")
            values[f"L{layer}/random-internal/{mode}"] = get("random") - get("internal")
    table = {key: shape(v) for key, v in values.items()}
    for key, row in table.items():
        print(f"{key:32s} " + " ".join(f"{name}={val:9.4g}" for name, val in row.items()))
    args.out.write_text(
        json.dumps({"values": {k: v.tolist() for k, v in values.items()}, "shape": table}, indent=1)
    )
    print(f"wrote {args.out}")


def coverage(
    sampler, true_mean: float, n: int, reps: int, n_boot: int, seed: int
) -> dict[str, float]:
    """Share of ``reps`` simulated samples of ``n`` whose interval covers ``true_mean``, per method
    (and the mean width)."""
    x = sampler((reps, n), torch.Generator().manual_seed(seed))
    out = {}
    for method in METHODS:
        lo, hi = bootstrap_intervals(x, n_boot=n_boot, seed=seed + 1, level=0.95, method=method)
        out[method] = float(((lo <= true_mean) & (true_mean <= hi)).double().mean())
        out[f"{method}_width"] = float((hi - lo).mean())
    return out


def simulate(args) -> None:
    torch.set_num_threads(args.threads)
    families = {}
    for sigma in args.sigmas:
        families[f"lognormal(sigma={sigma})"] = (
            lambda shape, g, s=sigma: (
                torch.randn(shape, generator=g, dtype=torch.float64).mul(s).exp()
            ),
            math.exp(sigma**2 / 2),
        )
    if args.values is not None:
        data = json.loads(args.values.read_text())["values"]
        for key in args.keys:
            pop = torch.tensor(data[key], dtype=torch.float64)
            families[f"real {key} (N={len(pop)})"] = (
                lambda shape, g, p=pop: p[torch.randint(0, len(p), shape, generator=g)],
                float(pop.mean()),
            )
    for name, (sampler, true_mean) in families.items():
        for n in args.ns:
            started = time.perf_counter()
            cov = coverage(sampler, true_mean, n, args.reps, args.n_boot, seed=n)
            line = " ".join(f"{m}={cov[m]:.3f}" for m in METHODS)
            widths = " ".join(f"{cov[m + '_width']:.3g}" for m in METHODS)
            print(
                f"{name:40s} n={n:3d}  {line}   widths {widths}  "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    sub = parser.add_subparsers(dest="command", required=True)
    real = sub.add_parser("real")
    real.add_argument("--train-sequences", type=int, default=64)
    real.add_argument("--eval-sequences", type=int, default=128)
    real.add_argument("--layers", type=int, nargs="+", default=[3, 6, 12, 18, 24])
    real.add_argument("--out", type=Path, required=True, help="JSON of the per-sequence values")
    sim = sub.add_parser("simulate")
    sim.add_argument("--reps", type=int, default=4000)
    sim.add_argument("--n-boot", type=int, default=2000)
    sim.add_argument("--ns", type=int, nargs="+", default=[8, 16, 32])
    sim.add_argument("--sigmas", type=float, nargs="+", default=[1.0])
    sim.add_argument("--values", type=Path, default=None, help="the JSON written by `real`")
    sim.add_argument("--keys", nargs="+", default=[])
    args = parser.parse_args()
    measure_real(args) if args.command == "real" else simulate(args)


if __name__ == "__main__":
    main()
