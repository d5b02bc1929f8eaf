"""The config's checks beyond its schema, each refusal naming the key and what is allowed.

The JSON schema (``schemas/config.schema.yaml``, checked by :mod:`lensspace.configfile`) checks
shapes and values and fills defaults; :func:`check_references` and :func:`check_model_fit` check
what a schema cannot: that names point at defined entries and that the settings fit the model.
Like :mod:`lensspace.settings`, this module imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lensspace.errors import LensspaceError
from lensspace.settings import RANDOM_MAX_POSITIONS, run_spec, token_split_params

ABLATION_SECTIONS = ("h0", "h1", "h2")


def check_references(config: dict[str, Any]) -> None:
    """Every run names a defined model and corpus; a run-level override names real keys;
    a random model's ``arch`` is a family the adapter knows."""
    for name, model in config["models"].items():
        if model["source"] == "random":
            from lensspace.adapter import (
                require_family,
            )  # torch: only where a random model is built

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
                raise LensspaceError(
                    f"runs.{run}.eval_corpora: '{corpus}' is not defined under corpora: "
                    f"(defined: {', '.join(sorted(config['corpora']))})"
                )
            if corpus == spec["corpus"]:
                raise LensspaceError(
                    f"runs.{run}.eval_corpora: '{corpus}' is the run's training corpus; "
                    "an eval corpus must be another one"
                )
        n_layers = config["models"][spec["model"]]["n_layers"]
        check_readouts(config, run, spec, n_layers)
        check_nodes(config, run, spec, n_layers)
        for section in ABLATION_SECTIONS:
            chosen = config.get(section, {}).get("layers")
            for layer in chosen if isinstance(chosen, list) else []:
                if not 0 <= layer < n_layers:
                    raise LensspaceError(
                        f"{section}.layers: layer {layer} does not exist in model "
                        f"'{spec['model']}' "
                        f"of run '{run}' (layers 0..{n_layers - 1})"
                    )
        window = config.get("shuffle", {}).get("window", 0)
        if window > n_layers:
            raise LensspaceError(
                f"shuffle.window: {window} is more blocks than model '{spec['model']}' "
                f"of run '{run}' has ({n_layers}); use at most {n_layers}"
            )


def check_readouts(
    config: dict[str, Any], run: str, spec: Mapping[str, Any], n_layers: int
) -> None:
    """A run's readouts are defined, a back half starts inside the model, a corpus probe has
    eval corpora to tell apart."""
    defined = config.get("readouts", {}).get("define", {})
    for name in spec.get("readouts", []):
        if name not in defined:
            raise LensspaceError(
                f"runs.{run}.readouts: '{name}' is not defined under readouts.define: "
                f"(defined: {', '.join(sorted(defined)) or 'none'})"
            )
        readout = defined[name]
        if readout["kind"] == "back_half" and readout["layer"] > n_layers:
            raise LensspaceError(
                f"readouts.define.{name}.layer: {readout['layer']} is beyond model "
                f"'{spec['model']}' of run '{run}' (layers 1..{n_layers}; {n_layers} = the "
                "unembedding alone)"
            )
        for layer in readout.get("layers") or []:
            if not 0 <= layer < n_layers:
                raise LensspaceError(
                    f"readouts.define.{name}.layers: layer {layer} does not exist in model "
                    f"'{spec['model']}' of run '{run}' (layers 0..{n_layers - 1})"
                )
        if readout["kind"] == "back_half" and min(readout.get("layers") or [0]) >= readout["layer"]:
            raise LensspaceError(
                f"readouts.define.{name}.layers: a back half is read at layers below its layer "
                f"{readout['layer']}; name at least one"
            )
        if readout.get("target") == "corpus" and not spec.get("eval_corpora"):
            raise LensspaceError(
                f"runs.{run}.readouts: the corpus probe '{name}' needs the run's eval_corpora "
                "(its classes are the run's corpus and each eval corpus); add one or drop it"
            )


def check_nodes(config: dict[str, Any], run: str, spec: Mapping[str, Any], n_layers: int) -> None:
    """The node experiment's layers exist and its sequences fit the run's token split."""
    section = config.get("nodes")
    if not section:
        return
    chosen = section.get("layers")
    for layer in chosen if isinstance(chosen, list) else []:
        if not 0 <= layer < n_layers:
            raise LensspaceError(
                f"nodes.layers: block {layer} does not exist in model '{spec['model']}' of run "
                f"'{run}' (blocks 0..{n_layers - 1})"
            )
    split = token_split_params(config, run)
    get = section.get  # a config not yet validated lacks the defaults: those keys are not checked
    fit = None if get("fit_sequences") is None else get("fit_sequences") + get("ridge_sequences", 0)
    needs = (
        (
            "fit_sequences + nodes.ridge_sequences",
            fit,
            split["train_sequences"],
            "data.train_sequences",
        ),
        (
            "jacobian_sequences",
            get("jacobian_sequences"),
            split["train_sequences"],
            "data.train_sequences",
        ),
        ("eval_sequences", get("eval_sequences"), split["eval_sequences"], "data.eval_sequences"),
        ("jacobian_positions", get("jacobian_positions"), split["seq_len"], "data.seq_len"),
    )
    for key, value, available, source in needs:
        if value is not None and value > available:
            raise LensspaceError(
                f"nodes.{key}: {value} is more than run '{run}' has ({source}: {available}); "
                f"lower it or raise {source}"
            )


def check_config(
    config: dict[str, Any], model_facts: Callable[[str], Mapping[str, int] | None]
) -> None:
    """Everything checkable before any job: the references, and the fit of every run's settings
    to its model wherever ``model_facts(name)`` already knows the model."""
    check_references(config)
    for run, spec in config["runs"].items():
        facts = model_facts(spec["model"])
        if facts is not None:
            check_model_fit(model_checks(config, run), facts, spec["model"], run)


def random_model_facts(name: str, spec: Mapping[str, Any]) -> dict[str, int]:
    """What a ``source: random`` model's config already says (the model need not exist yet);
    refuses head counts the architecture cannot build."""
    d_model, n_heads = spec["d_model"], spec["n_heads"]
    n_kv_heads = spec.get("n_kv_heads", n_heads)
    if d_model % n_heads:
        raise LensspaceError(
            f"models.{name}.n_heads: {n_heads} heads do not divide d_model {d_model}; "
            "choose n_heads so that d_model / n_heads is a whole number"
        )
    if n_heads % n_kv_heads:
        raise LensspaceError(
            f"models.{name}.n_kv_heads: {n_kv_heads} key/value heads do not divide "
            f"n_heads {n_heads}; choose a divisor of {n_heads}"
        )
    return {
        "d_model": d_model,
        "n_layers": spec["n_layers"],
        "context_length": spec.get("max_positions", RANDOM_MAX_POSITIONS),
    }


def manifest_facts(manifest: str | Path) -> dict[str, int]:
    """``d_model``, ``n_layers`` and ``context_length`` of a prepared model, from its manifest
    (a folder prepared before the manifest recorded the context: from its ``config.json``)."""
    facts = json.loads(Path(manifest).read_text())
    if "context_length" not in facts:
        model_config = json.loads((Path(manifest).parent / "config.json").read_text())
        facts["context_length"] = model_config.get(
            "max_position_embeddings", model_config.get("n_positions")
        )
    return {key: facts[key] for key in ("d_model", "n_layers", "context_length")}


def known_model_facts(
    name: str, spec: Mapping[str, Any], manifest: str | Path
) -> dict[str, int] | None:
    """What is known of a model before any job: a random model's config, or the manifest of a
    folder prepared from this very spec; None until the model is prepared."""
    if spec["source"] == "random":
        return random_model_facts(name, spec)
    if Path(manifest).exists() and json.loads(Path(manifest).read_text()).get("spec") == dict(spec):
        return manifest_facts(manifest)
    return None


def model_checks(config: dict, run: str) -> dict[str, Any]:
    """The run's settings that must fit its model, by config key (what :func:`check_model_fit`
    compares)."""
    spec = run_spec(config, run)
    seq_key = f"runs.{run}.data.seq_len" if "seq_len" in spec.get("data", {}) else "data.seq_len"
    return {
        seq_key: token_split_params(config, run)["seq_len"],
        "h1.heads.induction_half_len": config["h1"]["heads"]["induction_half_len"],
        **{f"{section}.k": list(config[section]["k"]) for section in ABLATION_SECTIONS},
    }


def check_model_fit(
    checks: Mapping[str, Any], facts: Mapping[str, int], model: str, run: str
) -> None:
    """Refuse settings the model cannot take, naming the config key: ``k`` above ``d_model``,
    sequences (or the induction probe) longer than the model's context."""
    where = f"model '{model}' of run '{run}'"
    d_model, context = facts["d_model"], facts.get("context_length")
    for key, value in checks.items():
        if key.endswith(".k"):
            for k in value:
                if not isinstance(k, str) and k > d_model:
                    raise LensspaceError(
                        f"{key}: {k} is larger than d_model {d_model} of {where}; "
                        f"use at most {d_model}, or half / quarter"
                    )
        elif key.endswith("seq_len") and context is not None and value > context:
            raise LensspaceError(
                f"{key}: {value} is longer than the context of {where} "
                f"({context} positions); use at most {context}"
            )
        elif key.endswith("induction_half_len") and context is not None and 2 * value > context:
            raise LensspaceError(
                f"{key}: {value} makes induction sequences of {2 * value} tokens, longer "
                f"than the context of {where} ({context} positions); use at most {context // 2}"
            )
