"""How close to this machine's limit each heavy rule of a finished run ran.

    .venv/bin/python benchmarks/roofline.py [--results results] [--config config.yaml] [--wall
        SECONDS]

In one run it measures the fp32 matrix-multiply rate (the rules' thread count) on the
unembedding's shape and on a square product, by torch's default BLAS and by oneDNN (the
workflow's CPU path, ``lensspace.gemm``; the peak is the faster), and the start-up of one job (a
fresh Python that
imports the package, loads the run's model and exits), with the allocator setting the jobs get (huge
pages; it restarts itself with it). From the config's settings it counts each
heavy rule's minimal FLOPs: the matrix products the work needs (the cost of the work, not of
the implementation; H0 counted with the head's linearity: one rank-k product per independent
subspace). From the run's `benchmark:` files it reads each rule's seconds and jobs, and prints
per rule: seconds, minimal GFLOP, achieved rate / measured peak, start-up share (as the jobs'
logs recorded it, where they did: ``provenance.logged_startups``; else one job's as measured now),
and why a rule sits far below the peak where the reason is known. Last, the whole run's floor on
this machine:
every heavy rule's minimal FLOPs at the peak, plus the log-sum-exps its jobs cannot skip (one per
logit of every output a KL compares or a training step's softmax needs, at the fastest rate
measured here for one), plus the jobs' start-ups and the rest of the run as measured; with
``--target SECONDS`` (say half of an earlier run's wall time), the average share of the peak the
heavy rules' products would need to finish in that time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from snakemake.utils import validate

from lensspace import gemm
from lensspace.experiments.shuffle import window_permutations
from lensspace.lenses import LensTraining, held_out_sequences
from lensspace.malloc import ask_for_huge_pages
from lensspace.provenance import benchmark_jobs, logged_startups
from lensspace.settings import (
    ablation_grid,
    experiment_layers,
    job_layers,
    layer_jobs,
    lens_training_params,
    second_ridge,
    seed_layout_grid,
    seed_layout_layers,
    shuffle_pair_chunks,
    token_split,
)

# Where a rule cannot reach the matrix-multiply rate, and why.
WHY = {
    "h0_layer": (
        "one fused loop over the vocabulary per cell: three operands read, float64 sums, "
        "slower than exp_s's rate"
    ),
    "cache_activations": "attention and norms at 128 tokens; writes every residual",
    "train_lens": "float64 least squares; Adam steps of 256 tokens with a softmax each",
    "eval_lens": "a KL over the vocabulary per token and layer, two passes (exp_s: one)",
    "ridge_lens": (
        "float64 least squares (the peak is fp32's); start-up a large share of a short job"
    ),
    "h1_layer": "a softmax-KL over the vocabulary per cell; attention and norms at 128 tokens",
    "h2_layer": "float64 least squares per layer; a softmax-KL over the vocabulary per cell",
    "shuffle_pairs": (
        "a softmax-KL over the vocabulary per order; attention and norms at 128 tokens"
    ),
    "shuffle_windows": (
        "a softmax-KL over the vocabulary per order; attention and norms at 128 tokens"
    ),
    "lens_quality": (
        "float64 least squares per budget; a loop over the vocabulary per H0 cell and KL per lens"
    ),
    "ood": (
        "tokenizing and caching each corpus; a loop over the vocabulary per H0 cell and KL per lens"
    ),
    "neurons": (
        "float64 neuron geometry; a fused entropy, KL and top-1 loop over the vocabulary "
        "per ablation"
    ),
}


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def job_keys(frame: pd.DataFrame) -> pd.Series:
    """``rule|job`` per row: what joins benchmark files to logs (``provenance``'s rule and job)."""
    return frame["rule"] + "|" + frame["job"]


def matmul_rate(threads: int, repeats: int = 5) -> dict[str, float]:
    """Median GFLOP/s of fp32 products, the unembedding's shape and 2048^3, by torch's default
    BLAS and by oneDNN (:mod:`lensspace.gemm`, the workflow's CPU path) where this wheel has it."""
    torch.set_num_threads(threads)
    shapes = {"[1024x576]x[576x49152]": (1024, 576, 49152), "2048^3": (2048, 2048, 2048)}
    rates = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        weight = b.T.contiguous()  # [n, k]: a linear layer's weight
        out = torch.empty(m, n)
        products = {"torch": lambda: torch.mm(a, b, out=out)}
        if gemm.active():
            products["oneDNN"] = lambda: gemm.linear(a, weight)
        for backend, product in products.items():
            rates[f"{name} {backend}"] = 2 * m * k * n / median_seconds(product, repeats) / 1e9
    return rates


def exp_rate(threads: int, vocab: int, repeats: int = 5) -> dict[str, float]:
    """Median G logits/s of a log-sum-exp over ``vocab`` logits: torch's own on 1,024 rows, and
    compiled (inductor's vectorised exp, one loop a pass) on 1,024 rows and on 128 rows of 4,096,
    which stay in cache as a kernel fused with the head's product would keep them. The fastest
    bounds the work (the compiled ones are left out where no compiler is found)."""
    torch.set_num_threads(threads)
    ways = {"torch, 1024 rows": (lambda y: torch.logsumexp(y, -1), (1024, vocab), 1)}
    try:
        compiled = torch.compile(
            lambda y: (y - y.amax(-1, keepdim=True)).exp().sum(-1).log(), dynamic=False
        )
        compiled(torch.randn(8, 64))
        ways["compiled, 1024 rows"] = (compiled, (1024, vocab), 1)
        ways["compiled, 128 x 4096 in cache"] = (compiled, (128, 4096), 64)
    except Exception as err:  # no C++ compiler, or an inductor limit
        print(
            f"compiled log-sum-exp unavailable ({type(err).__name__}); torch's own only",
            file=sys.stderr,
        )
    rates = {}
    for name, (way, shape, loops) in ways.items():
        y = torch.randn(*shape)
        way(y)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(loops):
                way(y)
            times.append((time.perf_counter() - started) / loops)
        rates[name] = y.numel() / statistics.median(times) / 1e9
    return rates


def startup_seconds(model: Path, repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter that imports lensspace, loads the model and exits
    (the exit, about a second with torch loaded, is in it; the fused CPU kernels' own start-up, in
    the jobs that use them, is counted by ``kernel_seconds``)."""
    code = (
        "from lensspace import runtime; import lensspace.experiments.h0, lensspace.lenses; "
        f"runtime.open_model({str(model / 'lensspace-model.json')!r}, 'cpu')"
    )
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def kernel_seconds(repeats: int = 3) -> float:
    """Median wall time a fresh interpreter spends loading the fused CPU kernels (compiled ones
    come from the on-disk cache: the first run on a machine compiles them once), after the
    imports a job has made already (transformers' model loading imports the compiler's front end).
    """
    code = (
        "import time, torch, transformers.modeling_utils, lensspace.experiments.h0; from lensspace "
        "import fused; "
        "x = torch.rand(4, 64); c = torch.rand(4, 1); "
        "t = time.perf_counter(); fused.change_sums(x, x.clone(), x.clone(), c, c.clone(), "
        "torch.rand(64), "
        "c.clone(), c.clone()); fused.kl_sums(x, x.clone(), x.clone()); print(time.perf_counter() "
        "- t)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # fills the cache
    return statistics.median(
        float(
            subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            ).stdout.split()[-1]
        )
        for _ in range(repeats)
    )


# the rules whose jobs load the fused kernels (compute.fused_cpu on a CPU; H1, H2, the shuffle and
# the lens evaluation compare against their reference with fused.kl_terms), as a run's logs show
# them
FUSED_RULES = {
    "eval_lens",
    "h0_layer",
    "h1_layer",
    "h2_layer",
    "shuffle_pairs",
    "shuffle_windows",
    "lens_quality",
    "ood",
    "neurons",
}


class Shape:
    """The model's sizes, from its config.json: what the FLOP counts need."""

    def __init__(self, folder: Path):
        import json

        c = json.loads((folder / "config.json").read_text())
        self.d = c.get("hidden_size", c.get("n_embd"))
        self.layers = c.get("num_hidden_layers", c.get("n_layer"))
        self.vocab = c["vocab_size"]
        heads = c.get("num_attention_heads", c.get("n_head"))
        kv = c.get("num_key_value_heads", heads)
        ff = c.get("intermediate_size") or c.get("n_inner") or 4 * self.d
        self.ff = ff
        gated = c.get("model_type") != "gpt2"  # Llama's MLP has three matrices
        self.layernorm = c.get("model_type") == "gpt2"  # centring: H0 needs a product per site
        self.block_params = (
            self.d * (2 * self.d + 2 * self.d * kv // heads) + (3 if gated else 2) * self.d * ff
        )

    def block(self, seq_len: int) -> float:
        """FLOPs of one block for one token (weights, plus causal attention at ``seq_len``)."""
        return 2 * self.block_params + 2 * seq_len * self.d

    @property
    def head(self) -> float:
        return 2 * self.d * self.vocab


def refinement_tokens(lens: LensTraining, n_sequences: int, t: int) -> tuple[int, int]:
    """(check tokens, target tokens) of the KL refinement on ``n_sequences`` training sequences, as
    ``lenses.held_out_sequences`` holds them out (0, 0 where the refinement is off)."""
    check = held_out_sequences(n_sequences, t, lens)
    if not len(check):  # no check, no refinement (lenses.train_lens)
        return 0, 0
    return len(check) * (t - 1), min(lens.refine_tokens, check.start * (t - 1))


def experiment_jobs(config: dict, n_layers: int, section: str) -> list[list[int]]:
    """The layers of each of ``section``'s per-layer jobs (``layers_per_job`` a job)."""
    return [
        job_layers(name)
        for name in layer_jobs(
            experiment_layers(config, n_layers, section), config["layers_per_job"]
        )
    ]


def shuffle_tokens(config: dict, split) -> int:
    """Sequences a shuffle order runs on: ``shuffle.eval_sequences``, at most the held-out
    split's."""
    return min(
        config["shuffle"].get("eval_sequences") or split.eval_sequences, split.eval_sequences
    )


def shuffle_spaces(shuffle: dict) -> int:
    """The orders' spaces a shuffle job runs: the native one always, lens_ridge only with a second
    ridge.
    """
    spaces = set(shuffle["spaces"]) | {"native"}
    return len(spaces - ({"lens_ridge"} if second_ridge(shuffle) is None else set()))


def minimal_flops(config: dict, run: str, shape: Shape) -> dict[str, float]:
    """Minimal FLOPs per heavy rule from the run's settings."""
    split = token_split(config, run)
    t = split.seq_len
    n_train, n_eval = split.train_sequences * t, split.eval_sequences * t
    evaluated = split.eval_sequences * (t - 1)
    d, big_l, head = shape.d, shape.layers, shape.head
    flops: dict[str, float] = {}
    flops["cache_activations"] = (n_train + n_eval) * big_l * shape.block(t)
    lens = LensTraining(**lens_training_params(config, run))
    n_check, n_targets = refinement_tokens(lens, split.train_sequences, t)
    fit_tokens = split.train_sequences * (t - 1) - n_check
    steps = lens.refine_steps if n_check else 0
    flops["train_lens"] = (
        big_l
        * (
            2 * fit_tokens * d * d  # the Gram matrix
            + steps * lens.refine_batch_tokens * 2 * head  # forward + input gradient
            + 2 * n_check * head
        )  # the keep-or-revert check, before and after
        + (n_targets + n_check) * head
    )  # the targets, once
    flops["eval_lens"] = evaluated * (head + big_l * (2 * head + 2 * d * d))
    flops["ridge_lens"] = big_l * 2 * split.train_sequences * (t - 1) * d * d
    g0 = ablation_grid(config, "h0")
    half = [k for k in g0.resolve_k(d) if 2 * k == d]
    per_layer = 0.0
    for k in g0.resolve_k(d):
        subspaces = [s for s in g0.subspaces if s != "random"]
        pairs = (
            len(g0.bases)
            if ("output" in subspaces and "internal" in subspaces and k in half)
            else len(g0.bases) * len(subspaces)
        )
        sites = len(g0.sites) if shape.layernorm else 1  # RMSNorm: one product serves both sites
        randoms = g0.random_draws if "random" in g0.subspaces else 0
        per_layer += (pairs + randoms) * sites * evaluated * 2 * k * shape.vocab
    flops["h0_layer"] = len(experiment_layers(config, big_l, "h0")) * (evaluated * head + per_layer)
    g1 = ablation_grid(config, "h1")
    h1_cells = len(g1.variants(d))

    def h1_job(
        layers: list[int],
    ) -> float:  # one clean pass from the job's earliest layer, then every cell
        return n_eval * ((big_l - min(layers)) * shape.block(t) + head) + sum(
            h1_cells * n_eval * ((big_l - layer) * shape.block(t) + head) for layer in layers
        )

    flops["h1_layer"] = sum(h1_job(layers) for layers in experiment_jobs(config, big_l, "h1"))
    h2 = config["h2"]

    def h2_job(
        layers: list[int],
    ) -> float:  # the target once per job; per layer its fit, refinement, routes and cells
        return evaluated * head + sum(
            2 * split.train_sequences * (t - 1) * d * d
            + h2["refine_steps"] * h2["refine_sequences"] * (t - 1) * 2 * head
            + evaluated * head  # the lens route (the cells' clean logits)
            + n_eval * (big_l - layer) * shape.block(t)
            + evaluated * head  # downstream
            + subspace_products(ablation_grid(config, "h2"), d, shape.vocab, evaluated)
            for layer in layers
        )

    flops["h2_layer"] = sum(h2_job(layers) for layers in experiment_jobs(config, big_l, "h2"))
    shuffle = config["shuffle"]
    n_shuffle = shuffle_tokens(config, split) * t

    def rest(start: int) -> float:  # blocks start..L-1 and the head on the shuffle's tokens
        return n_shuffle * ((big_l - start) * shape.block(t) + head)

    spaces = shuffle_spaces(shuffle)

    def shuffle_job(
        starts: list[int],
    ) -> float:  # one clean pass from the earliest start, then every order
        return rest(min(starts)) + spaces * sum(rest(start) for start in starts)

    flops["shuffle_pairs"] = sum(
        shuffle_job([i for i, _ in chunk]) for chunk in shuffle_pair_chunks(config, big_l)
    )
    windows = window_permutations(
        big_l, shuffle["window"], shuffle["window_samples"], config["seed"]
    )
    flops["shuffle_windows"] = shuffle_job([perm.start for perm in windows])
    flops.update(beyond_seed_flops(config, run, shape, split, lens))
    return flops


def subspace_products(grid, d: int, vocab: int, tokens: int) -> float:
    """An H2 layer's cells through the head's linearity: one rank-k product [tokens, k] x [k, V] per
    subspace (a carried plan: the halves are not complements, the modes share it)."""
    return sum(
        2 * tokens * k * vocab
        for k in grid.resolve_k(d)
        for _ in {(c.subspace, c.basis, c.draw) for c in grid.variants(d) if c.k == k}
    )


def minimal_rows(config: dict, run: str, shape: Shape) -> dict[str, float]:
    """Per heavy rule, the rows of logits (one token's output over the vocabulary) its jobs must
    log-sum-exp at least once: every output a KL compares, every softmax a training step needs
    (its gradient reuses it), every reference once per job. A floor, never the implementation's
    count; rows shared across rules (H0's clean logits are the lens evaluation's) are counted in
    each."""
    split = token_split(config, run)
    t, d, big_l = split.seq_len, shape.d, shape.layers
    evaluated = split.eval_sequences * (t - 1)
    lens = LensTraining(**lens_training_params(config, run))

    def refinement(
        n_sequences: int, layers: int
    ) -> float:  # Adam steps, the check before and after, targets
        n_check, n_targets = refinement_tokens(lens, n_sequences, t)
        return (
            layers * (lens.refine_steps * lens.refine_batch_tokens + 2 * n_check)
            + n_targets
            + n_check
            if n_check
            else 0.0
        )

    rows: dict[str, float] = {
        "train_lens": refinement(split.train_sequences, big_l),
        "eval_lens": evaluated * (1 + 2 * big_l),
    }  # the reference; tuned and logit lens per layer
    rows["h0_layer"] = (
        len(experiment_layers(config, big_l, "h0"))
        * evaluated
        * (1 + len(ablation_grid(config, "h0").variants(d)))
    )
    h1_cells = len(ablation_grid(config, "h1").variants(d))
    rows["h1_layer"] = sum(
        evaluated * (1 + h1_cells * len(layers)) for layers in experiment_jobs(config, big_l, "h1")
    )
    h2 = config["h2"]
    h2_cells = len(ablation_grid(config, "h2").variants(d))
    rows["h2_layer"] = sum(
        evaluated * (1 + len(layers) * (2 + h2_cells))  # target; lens, downstream, cells
        + len(layers) * h2["refine_steps"] * h2["refine_sequences"] * (t - 1)
        for layers in experiment_jobs(config, big_l, "h2")
    )
    shuffle = config["shuffle"]
    per_order = shuffle_tokens(config, split) * (t - 1)
    spaces = shuffle_spaces(shuffle)
    rows["shuffle_pairs"] = sum(
        per_order * (1 + spaces * len(chunk)) for chunk in shuffle_pair_chunks(config, big_l)
    )
    windows = window_permutations(
        big_l, shuffle["window"], shuffle["window_samples"], config["seed"]
    )
    rows["shuffle_windows"] = per_order * (1 + spaces * len(windows))
    q_layers = len(seed_layout_layers(config, "lens_quality", big_l))
    q_cells = len(seed_layout_grid(config, "lens_quality").variants(d))
    rows["lens_quality"] = (
        evaluated
        + sum(  # the reference once; per lens and layer its logits and the cells
            q_layers * evaluated * (1 + q_cells) + (refinement(n, q_layers) if refine else 0.0)
            for n, refine in quality_budgets(config, split)
        )
    )
    ood = config["ood"]
    ood_tokens = ood["eval_sequences"] * (t - 1)
    ood_cells = len(seed_layout_grid(config, "ood").variants(d))
    rows["ood"] = (
        len(config["runs"][run].get("eval_corpora", []))
        * ood_tokens
        * (  # per corpus: the reference;
            1 + len(seed_layout_layers(config, "ood", big_l)) * (2 + ood_cells)
        )
    )  # per layer tuned, logit lens, cells
    neurons = config["neurons"]
    ablated = neurons["n_matched"] + neurons["n_candidates"] + neurons["n_largest"]
    rows["neurons"] = 2 * ablated * neurons["eval_sequences"] * (t - 1)
    return rows


def seed_cells(config: dict, shape: Shape, evaluated: int) -> float:
    """The seed-layout H0 cells at one layer: the clean logits and one rank-d/2 product per subspace
    pair
    and random draw (the modes share it; pre_norm only)."""
    return (
        evaluated * shape.head
        + (1 + config["random_draws"]) * evaluated * 2 * (shape.d // 2) * shape.vocab
    )


def quality_budgets(config: dict, split) -> list[tuple[int, bool]]:
    """The lens-quality sweep's lenses: (training sequences, refined)."""
    quality = config["lens_quality"]
    return [
        (max(2, round(fraction * split.train_sequences)), refine)
        for fraction in quality["fractions"]
        for refine in quality["refine"]
    ]


def beyond_seed_flops(
    config: dict, run: str, shape: Shape, split, lens: LensTraining
) -> dict[str, float]:
    """Lens quality, out of distribution and neurons: their minimal FLOPs."""
    t, d, big_l, head = split.seq_len, shape.d, shape.layers, shape.head
    evaluated = split.eval_sequences * (t - 1)
    flops: dict[str, float] = {}
    layers = len(seed_layout_layers(config, "lens_quality", big_l))
    total = evaluated * head  # the model's own distribution, once
    for n, refine in quality_budgets(config, split):
        n_check, n_targets = refinement_tokens(lens, n, t) if refine else (0, 0)
        total += layers * 2 * (n * (t - 1) - n_check) * d * d
        if n_check:
            total += (
                layers
                * (lens.refine_steps * lens.refine_batch_tokens * 2 * head + 2 * n_check * head)
                + (n_targets + n_check) * head
            )
        # per layer: the lens map, then the seed cells, whose clean logits are the lens's
        total += layers * (evaluated * 2 * d * d + seed_cells(config, shape, evaluated))
    flops["lens_quality"] = total
    ood = config["ood"]
    ood_layers = len(seed_layout_layers(config, "ood", big_l))
    ood_tokens = ood["eval_sequences"] * (t - 1)
    corpora = len(config["runs"][run].get("eval_corpora", []))
    # per corpus: caching, the model's distribution, per layer the lens map, the logit lens and the
    # seed cells
    flops["ood"] = corpora * (
        ood["eval_sequences"] * t * big_l * shape.block(t)
        + ood_tokens * head
        + ood_layers * (ood_tokens * (head + 2 * d * d) + seed_cells(config, shape, ood_tokens))
    )
    neurons = config["neurons"]
    geometry = (
        big_l * shape.ff * 2 * d * d + 2 * shape.vocab * d * d
    )  # lens maps of the writes; the logit covariance
    stats = (
        (neurons["mean_sequences"] + neurons["eval_sequences"]) * t * big_l * shape.block(t)
    )  # activations only
    tokens = neurons["eval_sequences"] * (t - 1)
    # the clean last block and head once; then per ablated neuron (the measured ones and their
    # matched neurons, mostly shared), total and direct: about 8 elementwise passes of the
    # vocabulary per token
    ablated = min(shape.ff, neurons["n_matched"] + neurons["n_candidates"] + neurons["n_largest"])
    flops["neurons"] = (
        geometry
        + stats
        + neurons["eval_sequences"] * t * shape.block(t)
        + tokens * head
        + ablated * 2 * tokens * 8 * shape.vocab
    )
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument(
        "--wall", type=float, default=None, help="measured wall time of the whole run (s)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of the heavy rules (their `threads:`)"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="a wall time (s) to test the run against, e.g. half of an earlier run's",
    )
    args = parser.parse_args()
    if (
        os.environ.get("GLIBC_TUNABLES") != ask_for_huge_pages()
    ):  # the jobs' allocator: fresh outputs fault less
        os.execv(sys.executable, [sys.executable, *sys.argv])
    config = yaml.safe_load(args.config.read_text())
    validate(config, "schemas/config.schema.yaml")
    gemm.enable(config["compute"]["onednn_cpu"])
    rates = matmul_rate(args.threads)
    peak = max(rates.values())
    print(
        "fp32 matrix multiply, measured now: "
        + ", ".join(f"{n} {r:.0f} GFLOP/s" for n, r in rates.items())
    )
    jobs = benchmark_jobs(args.results)
    if jobs.empty:
        raise SystemExit(
            f"no benchmark files under {args.results}/benchmarks: run the workflow first"
        )
    rows, heavy_startup = [], 0.0
    logged = logged_startups(args.results)
    logged_s = dict(zip(job_keys(logged), logged["startup_s"] + logged["kernels_s"]))
    for run in config["runs"]:
        model = Path("resources/models") / config["runs"][run]["model"]
        shape = Shape(model)
        startup, kernels = startup_seconds(model), kernel_seconds()
        exps = exp_rate(args.threads, shape.vocab)
        exp_peak = max(exps.values())
        print(
            f"{run}: start-up of one job (imports + model load), measured now: {startup:.1f} s; "
            f"loading the fused kernels in {', '.join(sorted(FUSED_RULES))}: {kernels:.1f} s more"
        )
        print(
            f"{run}: log-sum-exp over the vocabulary, measured now: "
            + ", ".join(f"{n} {r:.2f}" for n, r in exps.items())
            + " G logits/s"
        )
        mine = jobs[jobs["job"].str.split("/").map(lambda parts: run in parts)]
        logit_rows = minimal_rows(config, run, shape)
        for rule, flops in minimal_flops(config, run, shape).items():
            part = mine[mine["rule"] == rule]
            if part.empty:
                continue
            seconds, n_jobs = part["s"].sum(), len(part)
            job_startup = startup + (kernels if rule in FUSED_RULES else 0.0)
            keys = job_keys(part)
            rule_startup = (
                sum(logged_s[k] for k in keys)
                if keys.isin(logged_s.keys()).all()
                else n_jobs * job_startup
            )  # as the jobs logged it, else as measured now
            heavy_startup += rule_startup
            exp_s = logit_rows.get(rule, 0.0) * shape.vocab / 1e9 / exp_peak
            rows.append(
                {
                    "run": run,
                    "rule": rule,
                    "jobs": n_jobs,
                    "s": round(seconds, 1),
                    "gflop": round(flops / 1e9),
                    "gflop_per_s": round(flops / 1e9 / seconds, 1),
                    "of_peak": round(flops / 1e9 / seconds / peak, 2),
                    "exp_s": round(exp_s, 1),
                    "floor_share": round((flops / 1e9 / peak + exp_s) / seconds, 2),
                    "startup_share": round(rule_startup / seconds, 2),
                    "why": WHY.get(rule, ""),
                }
            )
    print(pd.DataFrame(rows).to_string(index=False))
    print(
        "exp_s: the rule's minimal log-sum-exps at the fastest rate above; floor_share: (its "
        "products at the peak "
        "+ exp_s) / its seconds"
    )
    torch_jobs = jobs[
        jobs["rule"].isin(
            {
                "cache_activations",
                "train_lens",
                "eval_lens",
                "svd",
                "h0_layer",
                "h1_layer",
                "h1_heads",
                "h2_layer",
                "ridge_lens",
                "shuffle_pairs",
                "shuffle_windows",
                "lens_quality",
                "ood",
                "neurons",
            }
        )
    ]
    wall = args.wall if args.wall is not None else jobs["s"].sum()
    total = len(torch_jobs) * startup + int(torch_jobs["rule"].isin(FUSED_RULES).sum()) * kernels
    of_wall = f"{wall:.0f} s {'wall' if args.wall is not None else '(sum of job times)'}"
    print(
        f"torch jobs: {len(torch_jobs)}; their start-up (with the fused kernels' loading), one "
        "job's as measured "
        f"now times the jobs, about {total:.0f} s of {of_wall} = {total / wall:.2f} (target <= "
        "0.10)"
    )
    recorded = logged[job_keys(logged).isin(set(job_keys(torch_jobs)))]
    if len(recorded):
        startups, first_calls = recorded["startup_s"], recorded["kernels_s"]
        both = startups.sum() + first_calls.sum()
        print(
            f"as the run's logs recorded it: {len(recorded)} of the {len(torch_jobs)} torch jobs, "
            "process start to "
            f"model loaded {startups.sum():.0f} s (one job "
            f"{startups.min():.1f}-{startups.max():.1f} s), the fused "
            f"kernels' first calls {first_calls.sum():.0f} s (loading and one call each); "
            f"{both:.0f} s of {of_wall} = "
            f"{both / wall:.2f} (target <= 0.10)"
        )
    print(whole_run_floor(pd.DataFrame(rows), peak, heavy_startup, wall, args.target))


def whole_run_floor(
    rows: pd.DataFrame, peak: float, startup: float, wall: float, target: float | None
) -> str:
    """The run's lower bound here: the heavy rules' minimal FLOPs at ``peak`` GFLOP/s and their
    minimal log-sum-exps (``rows["exp_s"]``), plus their jobs' ``startup`` seconds and the time
    outside them (``wall`` minus their seconds, as measured, other jobs' start-ups included); with
    ``target``, the average share of the peak their products would need to finish in it, on the
    same footing as the share they reached (their seconds less their log-sum-exps and start-ups)."""
    at_peak, exps, heavy = rows["gflop"].sum() / peak, rows["exp_s"].sum(), rows["s"].sum()
    rest = max(0.0, wall - heavy)
    floor = at_peak + exps + startup + rest
    reached = at_peak / max(heavy - exps - startup, 1e-9)
    line = (
        f"whole run: the heavy rules' minimal FLOPs at the peak take {at_peak:.0f} s, their "
        "minimal log-sum-exps "
        f"{exps:.0f} s; they took {heavy:.0f} s, with their start-ups ({startup:.0f} s), so their "
        "products ran at "
        f"{reached:.2f} of the peak on average (at most: the rest of their time counted as "
        "products); with the rest "
        f"of the run ({rest:.0f} s), it cannot go below about {floor:.0f} s here"
    )
    if target is not None:
        room = target - exps - startup - rest
        need = at_peak / room if room > 0 else float("inf")
        line += (
            f"; in {target:.0f} s the heavy rules' products would need {need:.2f} of the peak on "
            "average"
            if need <= 1
            else f"; {target:.0f} s is below that floor "
            "(the products would need more than the peak)"
        )
    return line


if __name__ == "__main__":
    main()
