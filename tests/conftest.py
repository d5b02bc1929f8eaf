"""Shared fixtures: tiny randomly initialised models of every supported family, built in the
test, the real default model, and one real Snakemake run of the tiny config (session-scoped:
several test files read it).

Every test belongs to exactly one tier (markers registered in pyproject.toml):
- ``workflow``: runs Snakemake, a SLURM cluster or a browser. A test that uses one of
  ``WORKFLOW_FIXTURES`` is put here; a test that runs Snakemake without such a fixture carries
  ``@pytest.mark.workflow`` itself (``snakemake()`` below refuses to run in any other tier).
- ``real_model``: uses the real default model (the ``real`` fixture, prepared once a session).
- ``unit``: everything else; the fast loop, ``pytest -m unit``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from tuned_lens.nn import TunedLens

from lensspace import gemm
from lensspace.activations import ActivationCache, write_cache
from lensspace.adapter import Adapter
from lensspace.lenses import empty_lens
from lensspace.models import build_random_model

ROOT = Path(__file__).resolve().parents[1]

TIERS = ("unit", "real_model", "workflow")  # from the fastest to the slowest
REAL_MODEL_FIXTURES = frozenset({"real"})
WORKFLOW_FIXTURES = frozenset({"tiny_run", "slurm_run", "cluster", "chromium"})


def tier_of(fixtures, marked) -> str:
    """The tier of a test that uses ``fixtures`` (names, transitively) and carries the tier
    markers ``marked``: what its fixtures need, or its own marker where that is slower. A test
    marked as faster than its fixtures (unit with the real model, say) is an error, as is a test
    with two tier markers."""
    marked = sorted(set(marked))
    if len(marked) > 1:
        raise ValueError(f"more than one tier marker: {marked}")
    fixtures = set(fixtures)
    if fixtures & WORKFLOW_FIXTURES:
        needed = "workflow"
    elif fixtures & REAL_MODEL_FIXTURES:
        needed = "real_model"
    else:
        needed = "unit"
    if not marked:
        return needed
    if TIERS.index(marked[0]) < TIERS.index(needed):
        used = sorted(fixtures & (WORKFLOW_FIXTURES | REAL_MODEL_FIXTURES))
        raise ValueError(f"marked {marked[0]}, but its fixtures {used} make it {needed}")
    return marked[0]


def pytest_collection_modifyitems(config, items):
    """Give every test its one tier marker (see the module's docstring)."""
    errors = []
    for item in items:
        marked = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        try:
            tier = tier_of(getattr(item, "fixturenames", ()), marked)
        except ValueError as error:
            errors.append(f"{item.nodeid}: {error}")
            continue
        if tier not in marked:
            item.add_marker(getattr(pytest.mark, tier))
    if errors:
        raise pytest.UsageError("tier markers that contradict the tests:\n" + "\n".join(errors))


_running: list = []  # the test being run, for the tier checks of snakemake() and `real`


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.fixture(autouse=True)
def one_thread(request):
    """Unit tests run on one thread: their tensors are tiny, so hand-offs between threads would
    dominate them (four times slower on a loaded two-core machine, with the same results)."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def require_tier(*tiers: str, what: str) -> None:
    """Fail the running test unless it is in one of ``tiers``: a test in the fast loop that
    starts Snakemake or the real model would make the fast loop slow without anyone noticing."""
    if _running and not any(_running[-1].get_closest_marker(t) for t in tiers):
        pytest.fail(f"{what} in a test outside the tiers {tiers}: mark it (see tests/conftest.py)")


_SHAPE = {"n_layers": 3, "d_model": 32, "n_heads": 4}
_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
# One tiny random model per family of the adapter (and per variant with its own code path).
# Every family perturbs its norms (norm_std) so that gains and biases are not the identity;
# sliding windows are shorter than the test sequences, so layers get different masks.
TINY = {
    "gpt2": {"arch": "gpt2", **_SHAPE, "seed": 3},
    "llama": {"arch": "llama", **_SHAPE, "n_kv_heads": 2, "seed": 4},
    # Pythia: parallel attention and MLP, rotary on a quarter of each head, untied unembedding
    "gpt_neox": {
        "arch": "gpt_neox",
        **_SHAPE,
        "seed": 5,
        "norm_std": 0.1,
        "config": {"tie_word_embeddings": False, "use_parallel_residual": True},
    },
    # OPT-125m's shape (and every OPT but 350m): norms before the blocks' parts, a final norm
    "opt": {"arch": "opt", **_SHAPE, "seed": 6, "norm_std": 0.1, "config": {"ffn_dim": 128}},
    # OPT-350m's shape: norms after each block's parts, no final norm, project_in / project_out
    # around a narrower embedding
    "opt_350m": {
        "arch": "opt",
        **_SHAPE,
        "seed": 7,
        "norm_std": 0.1,
        "config": {"ffn_dim": 128, "word_embed_proj_dim": 16, "do_layer_norm_before": False},
    },
    "mistral": {
        "arch": "mistral",
        **_SHAPE,
        "n_kv_heads": 2,
        "seed": 8,
        "norm_std": 0.1,
        "config": {"sliding_window": 5},
    },
    "qwen2": {"arch": "qwen2", **_SHAPE, "n_kv_heads": 2, "seed": 9, "norm_std": 0.1},
    "qwen3": {"arch": "qwen3", **_SHAPE, "n_kv_heads": 2, "seed": 10, "norm_std": 0.1},
    "gemma": {"arch": "gemma", **_SHAPE, "n_kv_heads": 1, "seed": 11, "norm_std": 0.1},
    # soft-cap small enough to bend the tiny model's logits
    "gemma2": {
        "arch": "gemma2",
        **_SHAPE,
        "n_kv_heads": 2,
        "seed": 12,
        "norm_std": 0.1,
        "config": {"sliding_window": 5, "final_logit_softcapping": 2.0},
    },
    "gemma3_text": {
        "arch": "gemma3_text",
        **_SHAPE,
        "n_kv_heads": 2,
        "seed": 13,
        "norm_std": 0.1,
        "config": {"sliding_window": 5, "layer_types": _SLIDING, "final_logit_softcapping": 2.0},
    },
}


@pytest.fixture(params=sorted(TINY), scope="session")
def tiny(request):
    """(adapter, tokenizer) of a tiny random model, once per family."""
    model, tokenizer = build_random_model(TINY[request.param])
    model.requires_grad_(False)
    return Adapter(model), tokenizer


@pytest.fixture(scope="session")
def tiny_ids():
    return torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def model_head(adapter: Adapter, x: torch.Tensor, after_norm: bool = False) -> torch.Tensor:
    """The model's own logits for a last residual ``x`` [n, T, d] (or, ``after_norm``, for the
    final norm's output): its forward on dummy tokens with that tensor patched in, so the final
    norm, any projection, the unembedding and any soft-cap are the model's, not the adapter's."""
    patch_at = (
        adapter.final_norm if after_norm and adapter.final_norm is not None else adapter.blocks[-1]
    )
    handle = patch_at.register_forward_hook(lambda _m, _a, _out: x)
    try:
        return adapter.model(torch.zeros(x.shape[:2], dtype=torch.long), use_cache=False).logits
    finally:
        handle.remove()


def normalize64(adapter: Adapter, x: torch.Tensor) -> torch.Tensor:
    """The final norm without its gain, in float64, from its definition."""
    if adapter.norm_kind == "none":
        return x
    x = x - x.mean(-1, keepdim=True) if adapter.norm_kind == "layernorm" else x
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + adapter.norm_eps)


def head_logp64(adapter: Adapter, u: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of a normalised ``u`` in float64: gain, bias and unembedding (the
    adapter's parameters), then log-softmax."""
    gain, bias, out_bias = adapter.norm_gain, adapter.norm_bias, adapter.unembedding_bias
    if adapter.norm_kind != "none":
        u = u * gain.detach().double() + (bias.detach().double() if bias is not None else 0.0)
    logits = u @ adapter.unembedding.detach().double().T
    return (logits + out_bias.detach().double() if out_bias is not None else logits).log_softmax(-1)


@torch.no_grad()
def direct_kl64(
    adapter: Adapter,
    z: torch.Tensor,
    q: torch.Tensor,
    mode: str,
    site: str,
    mean: torch.Tensor | None,
) -> torch.Tensor:
    """Token KL(lens || ablated lens) [..] in float64, straight from the definitions: ablate
    ``z`` (pre_norm) or its normalised vector (post_norm, the norm's scale frozen), then norm,
    gain, bias and unembedding (the adapter's parameters, in float64), then log-softmax."""

    def ablate(x):
        coeff = x @ q if mode == "zero" else (x - mean) @ q
        return x - coeff @ q.T

    z, q = z.double(), q.double()
    mean = mean.double() if mean is not None else None
    clean = head_logp64(adapter, normalize64(adapter, z))
    if site == "pre_norm":
        ablated = head_logp64(adapter, normalize64(adapter, ablate(z)))
    else:
        ablated = head_logp64(adapter, ablate(normalize64(adapter, z)))
    return (clean.exp() * (clean - ablated)).sum(-1)


@dataclass
class Cached:
    """A tiny model's activation cache on disk and a lens with small random translators."""

    adapter: Adapter
    lens: object
    cache: ActivationCache
    tokens: dict


def make_cached(
    adapter: Adapter,
    folder: Path,
    seed: int,
    n_train: int,
    n_eval: int,
    seq_len: int,
    scale: float = 0.1,
) -> Cached:
    gen = torch.Generator().manual_seed(seed)
    tokens = {
        "train": torch.randint(0, 256, (n_train, seq_len), generator=gen, dtype=torch.int32),
        "eval": torch.randint(0, 256, (n_eval, seq_len), generator=gen, dtype=torch.int32),
    }
    write_cache(adapter, tokens, folder, {}, storage="float32")
    lens = empty_lens(adapter, "tiny")
    with torch.no_grad():
        for t in lens.layer_translators:
            t.weight.copy_(torch.randn(t.weight.shape, generator=gen) * scale)
            t.bias.copy_(torch.randn(t.bias.shape, generator=gen) * scale)
    return Cached(adapter, lens, ActivationCache(folder), tokens)


def snakemake(workdir: Path, *args: str, timeout: int = 900, env: dict | None = None):
    require_tier("workflow", what="Snakemake run")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny config plus a run whose lens was written by tuned-lens itself (pretrained)."""
    workdir = tmp_path_factory.mktemp("workflow")
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["corpora"]["tiny-text"]["path"] = str(ROOT / "tests" / "data" / "tiny_corpus.txt")
    model, _ = build_random_model(config["models"]["tiny-llama"])
    theirs = TunedLens.from_model(model)
    with torch.no_grad():
        for translator in theirs.layer_translators:
            translator.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    theirs.save(workdir / "their-lens")
    config["runs"]["tiny-llama-pretrained"] = {
        "model": "tiny-llama",
        "corpus": "tiny-text",
        "lens": {"source": "pretrained", "id": str(workdir / "their-lens")},
    }
    (workdir / "study.yaml").write_text(yaml.safe_dump(config))
    # six runs of about 35 jobs each: allow for a loaded machine
    done = snakemake(workdir, "--configfile", str(workdir / "study.yaml"), timeout=2400)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, config


@dataclass
class Real:
    """The embedded default's real model (SmolLM2-135M) on a few real bible sequences: its
    activation cache and a least-squares tuned lens. The regime where the confounds live:
    an attention sink at position 0, large lens biases, ill-conditioned translators."""

    adapter: Adapter
    tokenizer: object
    lens: object
    cache: ActivationCache
    tokens: dict
    model_folder: Path


REAL_MODEL = "smollm2-135m"
REAL_CORPUS = "web-bible"


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """Prepared once: the model and corpus go where the workflow puts them (``resources/``,
    shared with the README's main command), the cache and lens into a temporary folder."""
    require_tier("real_model", "workflow", what="the real model")
    from lensspace.corpus import TokenSplit, prepare_corpus, read_documents, tokenize_documents
    from lensspace.lenses import LensTraining, train_lens
    from lensspace.models import MANIFEST, load_model, prepare_model

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    resources = ROOT / "resources"
    folder = resources / "models" / REAL_MODEL
    if not (folder / MANIFEST).exists():
        prepare_model(
            REAL_MODEL, config["models"][REAL_MODEL], folder, resources / "downloads" / REAL_MODEL
        )
    corpus = resources / "corpora" / f"{REAL_CORPUS}.txt"
    if not corpus.exists():
        prepare_corpus(
            REAL_CORPUS,
            config["corpora"][REAL_CORPUS],
            corpus,
            resources / "downloads" / REAL_CORPUS,
        )
    model, tokenizer = load_model(folder)
    adapter = Adapter(gemm.route_linears(model))  # as runtime.open_model: products by oneDNN
    tokens = tokenize_documents(
        read_documents(corpus),
        tokenizer,
        TokenSplit(seq_len=128, train_sequences=24, eval_sequences=6, seed=0),
    )
    cache_dir = tmp_path_factory.mktemp("real") / "cache"
    write_cache(adapter, tokens, cache_dir, {}, storage="float16")
    cache = ActivationCache(cache_dir)
    lens = train_lens(adapter, cache, LensTraining(refine_steps=0), REAL_MODEL)
    return Real(adapter, tokenizer, lens, cache, tokens, folder)
