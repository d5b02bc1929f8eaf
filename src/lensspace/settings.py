"""From the validated config (plain dicts) to the typed settings each stage takes.

The JSON schema (``schemas/config.schema.yaml``) checks shapes and values and fills defaults;
:func:`check_references` checks what a schema cannot: that names point at defined entries.
"""

from __future__ import annotations

from typing import Any

from lensspace.adapter import require_family
from lensspace.corpus import TokenSplit
from lensspace.devices import ComputeSettings
from lensspace.errors import LensspaceError
from lensspace.experiments.circuits import CircuitSettings
from lensspace.experiments.grid import AblationGrid
from lensspace.experiments.h2 import EmbeddingLensSettings
from lensspace.experiments.lens_quality import LensQualitySettings
from lensspace.experiments.neurons import NeuronSettings
from lensspace.lenses import LensTraining


def check_references(config: dict[str, Any]) -> None:
    """Every run names a defined model and corpus; a run-level override names real keys;
    a random model's ``arch`` is a family the adapter knows."""
    for name, model in config["models"].items():
        if model["source"] == "random":
            require_family(model["arch"], f"models.{name}.arch")
    for run, spec in config["runs"].items():
        for kind, table in (("model", "models"), ("corpus", "corpora")):
            if spec[kind] not in config[table]:
                raise LensspaceError(
                    f"runs.{run}.{kind}: '{spec[kind]}' is not defined under {table}: "
                    f"(defined: {', '.join(sorted(config[table])) or 'none'})"
                )
        for corpus in spec.get("eval_corpora", []):
            if corpus not in config["corpora"]:
                raise LensspaceError(f"runs.{run}.eval_corpora: '{corpus}' is not defined under corpora: "
                                     f"(defined: {', '.join(sorted(config['corpora']))})")
            if corpus == spec["corpus"]:
                raise LensspaceError(f"runs.{run}.eval_corpora: '{corpus}' is the run's training corpus; "
                                     "an eval corpus must be another one")
        n_layers = config["models"][spec["model"]]["n_layers"]
        for section in ("h0", "h1", "h2"):
            chosen = config.get(section, {}).get("layers")
            for layer in chosen if isinstance(chosen, list) else []:
                if not 0 <= layer < n_layers:
                    raise LensspaceError(
                        f"{section}.layers: layer {layer} does not exist in model '{spec['model']}' "
                        f"of run '{run}' (layers 0..{n_layers - 1})"
                    )


def run_spec(config: dict, run: str) -> dict:
    if run not in config["runs"]:
        raise LensspaceError(f"run '{run}' is not in runs: ({', '.join(config['runs'])})")
    return config["runs"][run]


def token_split(config: dict, run: str) -> TokenSplit:
    data = {**config["data"], **run_spec(config, run).get("data", {})}
    return TokenSplit(seq_len=data["seq_len"], train_sequences=data["train_sequences"],
                      eval_sequences=data["eval_sequences"], seed=data["seed"])


def compute_settings(config: dict) -> ComputeSettings:
    """Batch sizes per device kind (``compute``, and ``cache.batch_size`` / ``gpu_batch_size``)
    and the TF32 switch."""
    compute, cache = config["compute"], config["cache"]
    return ComputeSettings(chunk_sequences=compute["chunk_sequences"],
                           gpu_chunk_sequences=compute["gpu_chunk_sequences"],
                           cache_batch_size=cache["batch_size"],
                           gpu_cache_batch_size=cache["gpu_batch_size"],
                           allow_tf32=compute["allow_tf32"])


def lens_training(config: dict, run: str) -> LensTraining:
    lens = run_spec(config, run)["lens"]
    merged = {**config["lens_training"], **{k: v for k, v in lens.items() if k != "source"}}
    return LensTraining(ridge=merged["ridge"], refine_steps=merged["refine_steps"],
                        refine_batch_tokens=merged["refine_batch_tokens"],
                        refine_tokens=merged["refine_tokens"],
                        check_tokens=merged["check_tokens"], lr=merged["lr"],
                        seed=config["seed"])


# Where each experiment ablates, and in which bases when the config does not choose.
_SITES = {"h1": ("residual",), "h2": ("embedding",)}
_BASES = {"h2": ("embed",)}


def ablation_grid(config: dict, section: str = "h0") -> AblationGrid:
    """The grid of ``h0`` (lens space), ``h1`` (residual stream) or ``h2`` (embedding input)."""
    grid = config[section]
    sites = tuple(grid["sites"]) if "sites" in grid else _SITES[section]
    bases = tuple(grid["bases"]) if "bases" in grid else _BASES[section]
    return AblationGrid(subspaces=tuple(grid["subspaces"]), ks=tuple(grid["k"]), bases=bases,
                        modes=tuple(grid["modes"]), sites=sites, seed=config["seed"],
                        n_boot=config["bootstrap"]["n_resamples"],
                        random_draws=config["random_draws"], experiment=section)


def embedding_lens_settings(config: dict) -> EmbeddingLensSettings:
    h2 = config["h2"]
    return EmbeddingLensSettings(objective=h2["objective"], ridge=h2["ridge"],
                                 refine_steps=h2["refine_steps"],
                                 refine_sequences=h2["refine_sequences"], lr=h2["lr"],
                                 seed=config["seed"])


def shuffle_pair_chunks(config: dict, n_layers: int) -> list[list[tuple[int, int]]]:
    """The swap pairs (i < j) of the config, cut into the batches that become jobs."""
    shuffle = config["shuffle"]
    if shuffle["pairs"] == "adjacent":
        pairs = [(i, i + 1) for i in range(n_layers - 1)]
    else:
        pairs = [(i, j) for i in range(n_layers) for j in range(i + 1, n_layers)]
    size = shuffle["pairs_per_job"]
    return [pairs[start: start + size] for start in range(0, len(pairs), size)]


def circuit_settings(config: dict, d_model: int) -> CircuitSettings:
    heads = config["h1"]["heads"]
    return CircuitSettings(k=d_model // 2, seed=config["seed"], **heads)


def layer_jobs(layers: list[int], per_job: int) -> list[str]:
    """The layers cut into jobs of at most ``per_job`` consecutive entries, each job named by its
    layers joined by ``_`` (``0_5_10``; one layer per job: just the layer, ``5``)."""
    return ["_".join(map(str, layers[start: start + per_job])) for start in range(0, len(layers), per_job)]


def job_layers(name: str) -> list[int]:
    """The layers of a job named by :func:`layer_jobs`."""
    return [int(part) for part in name.split("_")]


def experiment_layers(config: dict, n_layers: int, section: str = "h0") -> list[int]:
    """``all``, an explicit list, or ``{stride: s}`` (0, s, 2s, ... and always the last layer)."""
    layers = config[section]["layers"]
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, dict):
        picked = set(range(0, n_layers, layers["stride"])) | {n_layers - 1}
        return sorted(picked)
    return sorted(set(layers))


def neuron_settings(config: dict, n_layers: int, d_model: int) -> NeuronSettings:
    """The neuron experiment's settings; ``candidate_layers`` ``last``, ``all`` or a list."""
    section = config["neurons"]
    chosen = section["candidate_layers"]
    layers = ([n_layers - 1] if chosen == "last" else list(range(n_layers)) if chosen == "all"
              else sorted(set(chosen)))
    if any(not 0 <= layer < n_layers for layer in layers):
        raise LensspaceError(f"neurons.candidate_layers: {chosen} names a layer outside 0..{n_layers - 1}")
    return NeuronSettings(k=d_model // 2, candidate_layers=tuple(layers),
                          n_candidates=section["n_candidates"],
                          min_internal_share=section["min_internal_share"],
                          random_draws=config["random_draws"], match_pool=section["match_pool"],
                          eval_sequences=section["eval_sequences"],
                          mean_sequences=section["mean_sequences"],
                          n_boot=config["bootstrap"]["n_resamples"],
                          test_resamples=config["bootstrap"]["test_resamples"], seed=config["seed"])


def lens_quality_settings(config: dict, n_layers: int) -> LensQualitySettings:
    """The lens-quality sweep: budgets, and the seed-layout H0 cells at its layers (default: H0's)."""
    section = config["lens_quality"]
    layers = seed_layout_layers(config, "lens_quality", n_layers)
    grid = seed_layout_grid(config, "lens_quality")
    return LensQualitySettings(fractions=tuple(section["fractions"]), refine=tuple(section["refine"]),
                               layers=tuple(layers), grid=grid,
                               test_resamples=config["bootstrap"]["test_resamples"])


def seed_layout_layers(config: dict, section: str, n_layers: int) -> list[int]:
    """The layers of ``section`` (``layers: null`` = those of h0)."""
    chosen = config[section].get("layers") or config["h0"]["layers"]
    layers = experiment_layers({"h": {"layers": chosen}}, n_layers, "h")
    if any(not 0 <= layer < n_layers for layer in layers):
        raise LensspaceError(f"{section}.layers: {layers} names a layer outside 0..{n_layers - 1}")
    return layers


def seed_layout_grid(config: dict, section: str) -> AblationGrid:
    """The seed's H0 cells (output / internal / random, unembed basis, k = d/2, pre_norm) in ``section``'s modes."""
    return AblationGrid(subspaces=("output", "internal", "random"), ks=("half",), bases=("unembed",),
                        modes=tuple(config[section]["modes"]), sites=("pre_norm",), seed=config["seed"],
                        n_boot=config["bootstrap"]["n_resamples"], random_draws=config["random_draws"],
                        experiment=section)
