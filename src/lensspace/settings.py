"""From the validated config (plain dicts) to the settings each stage takes.

Rules pass settings as ``params:`` in plain values (the ``*_params`` functions: dicts of
builtins), because Snakemake's params rerun-trigger only sees builtin types and would miss
an edit carried by a dataclass; scripts rebuild the typed settings with ``Settings(**params)``.
This module imports no torch (parsing the Snakefile stays fast); the typed functions import
their dataclass when called. The checks of the config live in :mod:`lensspace.validation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lensspace.errors import LensspaceError

if TYPE_CHECKING:
    from lensspace.corpus import TokenSplit
    from lensspace.devices import ComputeSettings
    from lensspace.experiments.circuits import CircuitSettings
    from lensspace.experiments.grid import AblationGrid
    from lensspace.experiments.h2 import EmbeddingLensSettings
    from lensspace.lenses import LensTraining

# The context of a ``source: random`` model without ``max_positions`` (models.build_random_model).
RANDOM_MAX_POSITIONS = 512


def run_spec(config: dict, run: str) -> dict:
    if run not in config["runs"]:
        raise LensspaceError(f"run '{run}' is not in runs: ({', '.join(config['runs'])})")
    return config["runs"][run]


def token_split_params(config: dict, run: str) -> dict[str, int]:
    data = {**config["data"], **run_spec(config, run).get("data", {})}
    return {
        "seq_len": data["seq_len"],
        "train_sequences": data["train_sequences"],
        "eval_sequences": data["eval_sequences"],
        "seed": data["seed"],
    }


def token_split(config: dict, run: str) -> TokenSplit:
    from lensspace.corpus import TokenSplit

    return TokenSplit(**token_split_params(config, run))


def lens_training_params(config: dict, run: str) -> dict[str, Any]:
    lens = run_spec(config, run)["lens"]
    merged = {**config["lens_training"], **{k: v for k, v in lens.items() if k != "source"}}
    return {
        "ridge": merged["ridge"],
        "refine_steps": merged["refine_steps"],
        "refine_batch_tokens": merged["refine_batch_tokens"],
        "refine_tokens": merged["refine_tokens"],
        "check_tokens": merged["check_tokens"],
        "lr": merged["lr"],
        "seed": config["seed"],
    }


def compute_params(config: dict) -> dict[str, Any]:
    """Batch sizes per device kind (``compute``, and ``cache.batch_size`` / ``gpu_batch_size``)
    and the TF32 switch, as plain values (a rule's ``compute`` param)."""
    compute, cache = config["compute"], config["cache"]
    return {
        "chunk_sequences": compute["chunk_sequences"],
        "gpu_chunk_sequences": compute["gpu_chunk_sequences"],
        "cache_batch_size": cache["batch_size"],
        "gpu_cache_batch_size": cache["gpu_batch_size"],
        "allow_tf32": compute["allow_tf32"],
        "fused_cpu": compute["fused_cpu"],
        "onednn_cpu": compute["onednn_cpu"],
    }


def compute_settings(config: dict) -> ComputeSettings:
    from lensspace.devices import ComputeSettings

    return ComputeSettings(**compute_params(config))


def lens_training(config: dict, run: str) -> LensTraining:
    from lensspace.lenses import LensTraining

    return LensTraining(**lens_training_params(config, run))


def second_ridge(shuffle: Mapping) -> float | None:
    """The ridge of the ``lens_ridge`` space's lens, or None where that space is switched off."""
    ridge = shuffle.get("second_ridge")
    return float(ridge) if ridge is not None and "lens_ridge" in shuffle["spaces"] else None


def ridge_lens_params(shuffle: Mapping, seed: int) -> dict[str, Any] | None:
    """The least-squares fit (no KL refinement) of the second lens, or None when switched off."""
    ridge = second_ridge(shuffle)
    return None if ridge is None else {"ridge": ridge, "refine_steps": 0, "seed": seed}


def shuffle_params(config: dict, windows: bool) -> dict[str, Any]:
    """What a swap-pairs job (``windows`` False) or the window-permutations job reads of
    ``shuffle``."""
    shuffle = config["shuffle"]
    keys = ("spaces", "eval_sequences", *(("window", "window_samples") if windows else ()))
    return {key: shuffle.get(key) for key in keys}


# Where each experiment ablates, and in which bases when the config does not choose.
_SITES = {"h1": ("residual",), "h2": ("embedding",)}
_BASES = {"h2": ("embed",)}


def ablation_grid_params(config: dict, section: str = "h0") -> dict[str, Any]:
    grid = config[section]
    sites = tuple(grid["sites"]) if "sites" in grid else _SITES[section]
    bases = tuple(grid["bases"]) if "bases" in grid else _BASES[section]
    return {
        "subspaces": tuple(grid["subspaces"]),
        "ks": tuple(grid["k"]),
        "bases": bases,
        "modes": tuple(grid["modes"]),
        "sites": sites,
        "seed": config["seed"],
        "n_boot": config["bootstrap"]["n_resamples"],
        "random_draws": config["random_draws"],
        "experiment": section,
    }


def ablation_grid(config: dict, section: str = "h0") -> AblationGrid:
    """The grid of ``h0`` (lens space), ``h1`` (residual stream) or ``h2`` (embedding input)."""
    from lensspace.experiments.grid import AblationGrid

    return AblationGrid(**ablation_grid_params(config, section))


def embedding_lens_params(config: dict) -> dict[str, Any]:
    h2 = config["h2"]
    return {
        "objective": h2["objective"],
        "ridge": h2["ridge"],
        "refine_steps": h2["refine_steps"],
        "refine_sequences": h2["refine_sequences"],
        "lr": h2["lr"],
        "seed": config["seed"],
    }


def embedding_lens_settings(config: dict) -> EmbeddingLensSettings:
    from lensspace.experiments.h2 import EmbeddingLensSettings

    return EmbeddingLensSettings(**embedding_lens_params(config))


def shuffle_pair_chunks(config: dict, n_layers: int) -> list[list[tuple[int, int]]]:
    """The swap pairs (i < j) of the config, cut into the batches that become jobs."""
    shuffle = config["shuffle"]
    if shuffle["pairs"] == "adjacent":
        pairs = [(i, i + 1) for i in range(n_layers - 1)]
    elif shuffle["pairs"] == "disjoint":  # (0, 1), (2, 3), ...: every block swapped once
        pairs = [(i, i + 1) for i in range(0, n_layers - 1, 2)]
    else:
        pairs = [(i, j) for i in range(n_layers) for j in range(i + 1, n_layers)]
    size = shuffle["pairs_per_job"]
    return [pairs[start : start + size] for start in range(0, len(pairs), size)]


def circuit_params(config: dict) -> dict[str, Any]:
    """The circuit-ends settings but ``k`` (half the model's width, known once it is loaded)."""
    return {**config["h1"]["heads"], "seed": config["seed"]}


def circuit_settings(params: Mapping[str, Any], d_model: int) -> CircuitSettings:
    from lensspace.experiments.circuits import CircuitSettings

    return CircuitSettings(k=d_model // 2, **params)


def layer_jobs(layers: list[int], per_job: int) -> list[str]:
    """The layers cut into jobs of at most ``per_job`` consecutive entries, each job named by its
    layers joined by ``_`` (``0_5_10``; one layer per job: just the layer, ``5``)."""
    return [
        "_".join(map(str, layers[start : start + per_job]))
        for start in range(0, len(layers), per_job)
    ]


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


def seed_layout_layers(config: dict, section: str, n_layers: int) -> list[int]:
    """The layers of ``section`` (``layers: null`` = those of h0)."""
    chosen = config[section].get("layers") or config["h0"]["layers"]
    layers = experiment_layers({"h": {"layers": chosen}}, n_layers, "h")
    if any(not 0 <= layer < n_layers for layer in layers):
        raise LensspaceError(f"{section}.layers: {layers} names a layer outside 0..{n_layers - 1}")
    return layers


def seed_layout_grid(config: dict, section: str) -> AblationGrid:
    """The seed's H0 cells (output / internal / random, unembed basis, k = d/2, pre_norm) in
    ``section``'s modes."""
    from lensspace.experiments.grid import AblationGrid

    return AblationGrid(
        subspaces=("output", "internal", "random"),
        ks=("half",),
        bases=("unembed",),
        modes=tuple(config[section]["modes"]),
        sites=("pre_norm",),
        seed=config["seed"],
        n_boot=config["bootstrap"]["n_resamples"],
        random_draws=config["random_draws"],
        experiment=section,
    )
