"""The device policy, checked without a GPU: every torch rule's code runs with the model on a
stand-in accelerator, where any tensor left on the CPU stops the run.

Under ``FakeTensorMode`` an operation that mixes devices raises ``FakeTensorDeviceMismatchError``
instead of computing. The stand-in is a fake ``meta`` device, not a fake ``cuda`` one: this
CPU-only torch build can create fake cuda tensors but cannot index them (``x[:, 1:]`` needs a
CUDA device guard) nor copy to them, while fake meta tensors index, copy and refuse to mix with
CPU tensors exactly as CUDA tensors do. Fake tensors carry no values, so the scalars read off
them (``float``, ``item``, ``tolist``) are ones here, and tuned-lens's unembedding hash (taken
with ``.numpy()``) is replaced: only where each tensor lives is checked, not what it holds
(``benchmarks/gpu_run.sh`` compares the values of a real GPU run with the CPU's).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import TINY
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from tuned_lens.nn.unembed import Unembed

from lensspace import activations
from lensspace.activations import ActivationCache, write_cache
from lensspace.adapter import Adapter
from lensspace.devices import ComputeSettings, move, move_module
from lensspace.errors import LensspaceError
from lensspace.experiments import circuit_search, circuits, h0, h1, h2, nodes, shuffle
from lensspace.experiments.grid import AblationGrid
from lensspace.lenses import (
    LensTraining,
    empty_lens,
    evaluate_lens,
    load_lens,
    save_lens,
    train_lens,
)
from lensspace.models import build_random_model
from lensspace.runner import BlockRunner
from lensspace.subspaces import load_bases, save_bases, unembedding_bases

STAND_IN = torch.device("meta")


def _real_io(fn):
    """``fn`` run outside the fake mode: files are read into real CPU tensors, as on a GPU node."""

    def call(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    return call


class _RealSafeOpen:
    """``safetensors.safe_open`` reading real CPU tensors while the fake mode is on."""

    def __init__(self, *args, **kwargs):
        self.handle = _real_io(safetensors.safe_open)(*args, **kwargs)

    def __enter__(self):
        _real_io(self.handle.__enter__)()
        return self

    def __exit__(self, *exc):
        return _real_io(self.handle.__exit__)(*exc)

    def get_tensor(self, name: str) -> torch.Tensor:
        return _real_io(lambda: self.handle.get_tensor(name).clone())()


def _ones(t: torch.Tensor) -> np.ndarray:
    return np.ones(tuple(t.shape), dtype=float if t.dtype.is_floating_point else int)


@pytest.fixture(params=sorted(TINY))
def world(request, tmp_path, monkeypatch):
    """A tiny model's cache, lens and bases written for real on the CPU, then the model moved to
    the stand-in device inside ``FakeTensorMode``: yields (adapter, cache folder, tokens, lens
    folder, bases file, tmp folder)."""
    model, _ = build_random_model(TINY[request.param])
    model.requires_grad_(False)
    adapter = Adapter(model)
    gen = torch.Generator().manual_seed(0)
    tokens = {
        "train": torch.randint(0, 256, (8, 12), generator=gen, dtype=torch.int32),
        "eval": torch.randint(0, 256, (4, 12), generator=gen, dtype=torch.int32),
    }
    write_cache(adapter, tokens, tmp_path / "cache", {}, storage="float16")
    lens = empty_lens(adapter, "tiny")
    with torch.no_grad():
        for translator in lens.layer_translators:
            translator.weight.normal_(0, 0.1, generator=gen)
    save_lens(lens, tmp_path / "lens")
    save_bases(unembedding_bases(adapter), str(tmp_path / "bases.safetensors"))
    for name, value in (
        ("item", lambda self: _ones(self).item()),
        ("tolist", lambda self: _ones(self).tolist()),
        ("__float__", lambda self: 1.0),
        ("__int__", lambda self: 1),
        ("__bool__", lambda self: False),
    ):
        monkeypatch.setattr(FakeTensor, name, value, raising=False)
    monkeypatch.setattr(Unembed, "unembedding_hash", lambda self: "fake")
    monkeypatch.setattr(activations, "safe_open", _RealSafeOpen)
    monkeypatch.setattr(safetensors.torch, "load_file", _real_io(safetensors.torch.load_file))
    monkeypatch.setattr(torch, "load", _real_io(torch.load))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to(STAND_IN)  # what load_model does with the configured device
        yield (
            adapter,
            tmp_path / "cache",
            tokens,
            tmp_path / "lens",
            str(tmp_path / "bases.safetensors"),
            tmp_path,
        )
        del adapter, model
        gc.collect()  # fake tensors must not outlive their mode (a later mode then crashes)


GRID = dict(
    subspaces=("output", "internal", "random"),
    ks=(4,),
    modes=("zero", "mean"),
    random_draws=2,
    n_boot=10,
)


def on_device(t: torch.Tensor) -> bool:
    return t.device == STAND_IN


def test_the_adapter_owns_the_device_and_moves_tensors(world):
    adapter, folder, *_ = world
    assert adapter.device == STAND_IN
    assert on_device(adapter.to_device(torch.ones(3)))
    cache = ActivationCache(folder, device=adapter.device)
    assert on_device(cache.load(1, "eval")) and cache.load(1, "eval").dtype == torch.float32


def test_cache_activations_runs_on_the_device(world, monkeypatch):
    adapter, _, tokens, _, _, tmp = world
    written = {}
    # fake tensors cannot be serialized: an empty file stands in (the cache records its size
    # and sha256)
    monkeypatch.setattr(
        activations,
        "save_file",
        lambda tensors, path: (written.update(tensors), Path(path).write_bytes(b"")),
    )
    write_cache(adapter, tokens, tmp / "again", {}, batch_size=3)
    assert written and all(t.device.type == "cpu" for t in written.values())


def test_lens_training_and_evaluation_run_on_the_device(world):
    adapter, folder, _, lens_folder, _, _ = world
    cache = ActivationCache(folder, device=adapter.device)
    ridge = train_lens(adapter, cache, LensTraining(ridge=10.0, refine_steps=0), "tiny")
    assert all(on_device(p) for p in ridge.layer_translators.parameters())
    loaded = load_lens(adapter, lens_folder)
    assert all(on_device(p) for p in loaded.parameters())
    assert len(evaluate_lens(adapter, loaded, cache, n_boot=10, seed=0)) == 2 * adapter.n_layers


def test_h0_runs_on_the_device(world):
    adapter, folder, _, lens_folder, bases_file, _ = world
    cache, lens = ActivationCache(folder, device=adapter.device), load_lens(adapter, lens_folder)
    bases = load_bases(bases_file, adapter.device)
    grid = AblationGrid(**GRID)
    results = h0.run_layer(adapter, lens, cache, bases, 1, grid)
    assert results.kl and all(
        part.device.type == "cpu" for parts in results.kl.values() for part in parts
    )
    assert h0.norm_shares(adapter, lens, cache, bases, 1, grid)


def test_h1_and_its_circuits_run_on_the_device(world):
    adapter, folder, tokens, lens_folder, bases_file, _ = world
    cache, lens = ActivationCache(folder, device=adapter.device), load_lens(adapter, lens_folder)
    bases = load_bases(bases_file, adapter.device)
    grid = AblationGrid(
        **{
            **GRID,
            "bases": ("unembed", "unembed_centered", "lens_pullback"),
            "sites": ("residual",),
            "experiment": "h1",
        }
    )
    assert h1.run_layers(BlockRunner(adapter), lens, cache, bases, [0, 1], grid)[1].kl
    settings = circuits.CircuitSettings(
        k=adapter.d_model // 2, induction_sequences=2, induction_half_len=4, n_permutations=100
    )
    heads, mlps = circuits.head_and_mlp_fractions(
        adapter, lens, bases, adapter.to_device(tokens["eval"]), settings.k
    )
    scores = circuits.induction_scores(adapter, settings, 256)
    circuits.layer_permutation_test(heads.output, scores > 0.3, 100, 10, 0)


@pytest.mark.parametrize("objective", ["lens", "downstream"])
def test_h2_runs_on_the_device(world, objective):
    adapter, folder, _, lens_folder, _, _ = world
    cache, lens = ActivationCache(folder, device=adapter.device), load_lens(adapter, lens_folder)
    runner = BlockRunner(adapter)
    settings = h2.EmbeddingLensSettings(objective=objective, refine_steps=2, refine_sequences=2)
    emb_lens = h2.fit_embedding_lenses(runner, lens, cache, [2], settings)[2]
    assert on_device(emb_lens.linear.weight)
    grid = AblationGrid(
        **{**GRID, "bases": ("embed",), "sites": ("embedding",), "experiment": "h2"}
    )
    basis = h2.embedding_basis(adapter)
    assert on_device(basis.vectors)
    fit, results = h2.evaluate_layers(runner, lens, cache, {2: emb_lens}, basis, grid)[2]
    assert results.kl and "r2" in fit


def test_shuffle_runs_on_the_device(world):
    adapter, folder, _, lens_folder, _, _ = world
    cache, lens = ActivationCache(folder, device=adapter.device), load_lens(adapter, lens_folder)
    runner = BlockRunner(adapter)
    blocks = shuffle.LensSpaceBlocks(runner, lens, 0.001)
    perms = [
        shuffle.swap(adapter.n_layers, 0, 2),
        *shuffle.window_permutations(adapter.n_layers, 2, 2, 0),
    ]
    rows = shuffle.measure(runner, cache, perms, {"lens": blocks}, n_boot=10, seed=0, n_sequences=2)
    assert len(rows) == 2 * len(perms)


def test_nodes_run_on_the_device(world):
    adapter, folder, _, lens_folder, bases_file, _ = world
    cache, lens = ActivationCache(folder, device=adapter.device), load_lens(adapter, lens_folder)
    basis = load_bases(bases_file, adapter.device)["unembed"].vectors
    settings = nodes.NodeSettings(
        k=adapter.d_model // 2,
        fit_sequences=4,
        ridge_sequences=2,
        eval_sequences=2,
        jacobian_sequences=1,
        jacobian_positions=6,
        kl_stride=2,
        chunk=2,
    )
    rows, fits = nodes.run_layer(BlockRunner(adapter), lens, cache, basis, 1, settings)
    assert len(fits) == adapter.n_heads + 1 and len(rows) == len(fits) * 6 * 2


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_run.sh runs it)"
)
def test_a_real_gpu_gives_the_cpu_results(tmp_path):
    """H0 and H1 at one layer, on the CPU and on the GPU from the same cache, lens and bases."""
    model, _ = build_random_model(TINY["llama"])
    model.requires_grad_(False)
    adapter = Adapter(model)
    tokens = {
        "train": torch.randint(
            0, 256, (8, 16), generator=torch.Generator().manual_seed(0), dtype=torch.int32
        ),
        "eval": torch.randint(
            0, 256, (4, 16), generator=torch.Generator().manual_seed(1), dtype=torch.int32
        ),
    }
    write_cache(adapter, tokens, tmp_path / "cache", {}, storage="float32")
    save_lens(
        train_lens(adapter, ActivationCache(tmp_path / "cache"), LensTraining(refine_steps=0), "t"),
        tmp_path / "lens",
    )
    save_bases(unembedding_bases(adapter), str(tmp_path / "bases.safetensors"))
    grid = AblationGrid(**GRID)
    kls = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        cache = ActivationCache(tmp_path / "cache", device=adapter.device)
        lens, bases = (
            load_lens(adapter, tmp_path / "lens"),
            load_bases(str(tmp_path / "bases.safetensors"), adapter.device),
        )
        h0_kl = h0.run_layer(adapter, lens, cache, bases, 1, grid).per_sequence()
        h1_kl = h1.run_layers(
            BlockRunner(adapter),
            lens,
            cache,
            bases,
            [1],
            AblationGrid(**{**GRID, "sites": ("residual",), "experiment": "h1"}),
        )[1].per_sequence()
        kls[device] = torch.tensor([row["kl"] for row in h0_kl + h1_kl])
    assert torch.allclose(kls["cuda"], kls["cpu"], rtol=1e-4, atol=1e-7)


def test_move_module_keeps_tied_weights_tied_and_moves_buffers():
    """Llama ties W_E and W_U: one parameter, moved once; the rotary buffers move too."""
    model, _ = build_random_model(TINY["llama"])
    adapter = Adapter(model)
    assert adapter.embed.weight is model.lm_head.weight
    move_module(model, STAND_IN)
    assert adapter.device == STAND_IN and adapter.embed.weight is model.lm_head.weight
    assert all(t.device == STAND_IN for t in [*model.parameters(), *model.buffers()])
    assert move(adapter.unembedding, STAND_IN) is adapter.unembedding  # already there: no copy


def test_batch_sizes_follow_the_device_kind():
    settings = ComputeSettings(
        chunk_sequences=4, gpu_chunk_sequences=16, cache_batch_size=8, gpu_cache_batch_size=32
    )
    assert (
        settings.chunk("cpu"),
        settings.chunk("cuda:0"),
        settings.chunk(torch.device("cuda")),
    ) == (4, 16, 16)
    assert (settings.cache_batch("cpu"), settings.cache_batch("cuda")) == (8, 32)


def test_random_model_vocab_size_sets_the_unembedding_rows():
    model, tokenizer = build_random_model({**TINY["gpt2"], "vocab_size": 300})
    assert (
        Adapter(model).unembedding.shape == (300, TINY["gpt2"]["d_model"]) and len(tokenizer) == 257
    )
    with pytest.raises(LensspaceError, match="vocab_size 100"):
        build_random_model({**TINY["gpt2"], "vocab_size": 100})


def test_the_cache_records_where_it_was_computed_and_the_report_says_so(tmp_path, tiny_ids):
    from lensspace.devices import configure_numerics, describe
    from lensspace.provenance import compute_records

    model, _ = build_random_model(TINY["gpt2"])
    adapter = Adapter(model)
    configure_numerics(allow_tf32=False)
    write_cache(
        adapter,
        {"eval": tiny_ids.int()},
        tmp_path / "run-a" / "activations",
        {"compute": describe(adapter.device)},
    )
    assert compute_records(tmp_path, ["run-a", "run-b"]) == {
        "compute (run-a)": "cpu; TF32 off, fp32 matmul precision highest, CPU products by oneDNN"
    }


def test_circuit_search_runs_on_the_device(world):
    adapter = world[0]
    if adapter.norms_after_parts:
        pytest.skip("OPT-350m is refused by the circuit search")
    runner = circuit_search.GraphRunner(adapter)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupt = ids.flip(1)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 1] - logits[:, 2]

    prompts = circuit_search.prompts_of(runner, ids, corrupt, metric)
    assert on_device(prompts.clean)
    counter = circuit_search.FlopCounter(adapter, 6, 2)
    full = circuit_search.eap_ig(runner, prompts, 2, counter)
    kept = circuit_search.random_nodes(runner.graph.n_upstream, 0.5, seed=0)
    with torch.no_grad():
        corrupt_run = runner.run(prompts.corrupt)
    restricted = circuit_search.eap_ig(runner, prompts, 2, counter, kept, corrupt_run)
    assert full.edges.shape == restricted.edges.shape == runner.valid.shape
    whole = circuit_search.circuit_metric(
        runner, prompts, corrupt_run, runner.graph.restricted(kept)
    )
    assert on_device(whole)
