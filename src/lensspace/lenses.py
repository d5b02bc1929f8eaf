"""Tuned lenses: fit (least squares, then KL), save and load in tuned-lens's format, evaluate.

A translator maps layer ``i``'s residual into lens space, ``z = T_i(h) = h + A_i h + b_i``
(tuned-lens's residual parametrisation); the lens prediction is the model's own final norm
and unembedding applied to ``z``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from tuned_lens.nn import TunedLens
from tuned_lens.nn.lenses import TunedLensConfig
from tuned_lens.nn.unembed import Unembed

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.devices import move, move_module
from lensspace.divergences import KLReference, kl_from_logprobs, kl_loss, kl_target
from lensspace.errors import LensspaceError
from lensspace.stats import Estimate, bootstrap_mean

# Each layer's refinement generator is seeded with seed + LAYER_SEED_STRIDE * (layer + 1).
LAYER_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class LensTraining:
    """Settings of ``source: train``: ridge of the closed form, then the KL refinement budget.

    ``check_tokens``: about this many evaluated training tokens (``seq_len - 1`` per sequence)
    are held out as whole sequences to decide whether a layer keeps its refinement; rounded to
    whole sequences, at least one, at most a quarter of the training sequences (see
    ``held_out_sequences``); 0 turns the refinement off.
    """

    ridge: float = 1e-3
    refine_steps: int = 12
    refine_batch_tokens: int = 256
    refine_tokens: int = 2048
    check_tokens: int = 512
    lr: float = 2e-4
    seed: int = 0


def fit_affine(
    h: torch.Tensor, target: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``target ~ h + A h + b`` with a ridge on ``A``; returns ``(A, b)``.

    Solved in float64 on centred data, so the bias is exact and unpenalised; the ridge is
    relative to the mean variance of ``h``, which keeps one setting sensible across models.
    """
    h, y = h.double(), (target - h).double()
    h_mean, y_mean = h.mean(0), y.mean(0)
    hc, yc = h - h_mean, y - y_mean
    gram = hc.T @ hc
    lam = ridge * gram.diagonal().mean()
    gram.diagonal().add_(lam)
    weight = torch.linalg.solve(gram, hc.T @ yc)  # [d_in, d_out]
    bias = y_mean - h_mean @ weight
    return weight.T.float().contiguous(), bias.float()


def translate(lens: TunedLens, h: torch.Tensor, layer: int) -> torch.Tensor:
    """Lens space: ``T_layer(h)``."""
    return lens.transform_hidden(h, layer)


class AdapterUnembed(Unembed):
    """tuned-lens's ``Unembed`` with our model surgery: works for every family of the adapter.

    tuned-lens's own ``Unembed`` knows a few base-model classes and ignores soft-caps and
    projections; this one is the adapter's head. It keeps no copy of the weights, and the model's
    modules are not registered in it (a lens's ``.to()`` or ``.float()`` leaves the model alone).
    The hash is tuned-lens's: of the output embedding's weight, as its ``Unembed`` computes it.
    """

    def __init__(self, adapter: Adapter):
        torch.nn.Module.__init__(self)
        self._adapter = adapter

    @property
    def unembedding(self) -> torch.nn.Linear:
        return self._adapter.output_embedding

    @property
    def final_norm(self) -> torch.nn.Module | None:
        return self._adapter.final_norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._adapter.logits(h)


def empty_lens(adapter: Adapter, name: str) -> TunedLens:
    """A tuned-lens ``TunedLens`` with zero translators (equal to the logit lens), on the
    adapter's device (tuned-lens builds its translators on the CPU)."""
    config = TunedLensConfig(
        base_model_name_or_path=name, d_model=adapter.d_model, num_hidden_layers=adapter.n_layers
    )
    return move_module(TunedLens(AdapterUnembed(adapter), config), adapter.device)


def held_out_sequences(n_sequences: int, seq_len: int, settings: LensTraining) -> range:
    """The training sequences held out for the refinement's keep-or-revert check: the rest fit.

    A block at the end of the train split, about ``check_tokens / (seq_len - 1)`` sequences,
    at least one and at most a quarter of the split (so the fit keeps most of it); empty when
    there is no refinement to check or a single sequence. The train split is one document
    stream in order (``corpus.split_documents``), so the block shares at most one document,
    the one cut at its first sequence, with the fitted sequences.
    """
    if not (settings.refine_steps and settings.check_tokens) or n_sequences < 2:
        return range(n_sequences, n_sequences)
    n_check = min(max(1, round(settings.check_tokens / (seq_len - 1))), max(1, n_sequences // 4))
    return range(n_sequences - n_check, n_sequences)


@dataclass
class LensFit:
    """A trained lens and, per layer whose refinement was checked, whether it was kept."""

    lens: TunedLens
    refinement_kept: dict[int, bool]


def train_lens(
    adapter: Adapter,
    cache: ActivationCache,
    settings: LensTraining,
    name: str,
    layers: Sequence[int] | None = None,
) -> TunedLens:
    """The lens of :func:`fit_lens`."""
    return fit_lens(adapter, cache, settings, name, layers).lens


def fit_lens(
    adapter: Adapter,
    cache: ActivationCache,
    settings: LensTraining,
    name: str,
    layers: Sequence[int] | None = None,
) -> LensFit:
    """Fit every translator (or those of ``layers``; the others stay zero) by ridge least squares
    to the last residual, then refine by KL.

    The least-squares fit and the refinement use the training sequences outside
    ``held_out_sequences``; the refinement is kept only where it lowers the KL on those held-out
    sequences, which neither saw, so a kept refinement improved the lens beyond its fitting data.
    Each layer's refinement draws from its own seeded generator, so a layer's translator is the
    same whichever other layers are trained with it.
    """
    lens = empty_lens(adapter, name)
    final_seqs = cache.final("train")
    check = held_out_sequences(len(final_seqs), final_seqs.shape[1], settings)
    final, check_final = (
        _positions(final_seqs[: check.start]),
        _positions(final_seqs[check.start :]),
    )
    gen = torch.Generator().manual_seed(settings.seed)
    refine_idx = move(
        torch.randperm(len(final), generator=gen)[: settings.refine_tokens], final.device
    )
    with torch.no_grad():
        target = kl_target(adapter.logits(final[refine_idx]).log_softmax(-1))
        check_target = adapter.logits(check_final).log_softmax(-1)
        check_p = check_target.exp()  # once: both checks of every layer compare with it
    kept_by_layer: dict[int, bool] = {}
    for layer in tqdm(
        range(adapter.n_layers) if layers is None else layers,
        desc="lens",
        file=sys.stderr,
        mininterval=5,
    ):
        seqs = cache.load(layer, "train")
        h, h_check = _positions(seqs[: check.start]), _positions(seqs[check.start :])
        weight, bias = fit_affine(h, final, settings.ridge)
        translator = lens.layer_translators[layer]
        with torch.no_grad():
            translator.weight.copy_(weight)
            translator.bias.copy_(bias)
        if len(check):
            before = _kl(adapter, translator, h_check, check_target, check_p)
            layer_gen = torch.Generator().manual_seed(
                settings.seed + LAYER_SEED_STRIDE * (layer + 1)
            )
            _refine(adapter, translator, h[refine_idx], target, settings, layer_gen)
            after = _kl(adapter, translator, h_check, check_target, check_p)
            kept = after < before
            kept_by_layer[layer] = kept
            if not kept:
                with torch.no_grad():
                    translator.weight.copy_(weight)
                    translator.bias.copy_(bias)
            print(
                f"layer {layer}: KL on {len(check)} held-out training sequences {before:.4f} after "
                f"least squares, {after:.4f} after refinement ({'kept' if kept else 'reverted'})",
                file=sys.stderr,
            )
    return LensFit(lens, kept_by_layer)


def _refine(
    adapter: Adapter,
    translator: torch.nn.Linear,
    h: torch.Tensor,
    target: tuple[torch.Tensor, torch.Tensor],
    settings: LensTraining,
    gen: torch.Generator,
) -> None:
    """Adam on KL(p_final || p_lens) from the least-squares start, on a fixed token subset
    (``target``: ``p_final`` and ``sum p log p`` of its tokens)."""
    target_p, target_p_logp = target
    translator.requires_grad_(True)
    opt = torch.optim.Adam(translator.parameters(), lr=settings.lr)
    for _ in range(settings.refine_steps):
        batch = move(
            torch.randint(0, len(h), (settings.refine_batch_tokens,), generator=gen), h.device
        )
        z = h[batch] + translator(h[batch])
        loss = kl_loss(adapter.logits(z), target_p[batch], target_p_logp[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    translator.requires_grad_(False)


@torch.no_grad()
def _kl(
    adapter: Adapter,
    translator: torch.nn.Linear,
    h: torch.Tensor,
    target: torch.Tensor,
    target_p: torch.Tensor,
) -> float:
    """Mean token KL(target || the lens at ``h``); ``target_p = exp(target)``."""
    return float(
        kl_from_logprobs(target, adapter.logits(h + translator(h)).log_softmax(-1), target_p).mean()
    )


def save_lens(lens: TunedLens, folder: Path) -> None:
    """Write ``config.json`` + ``params.pt`` (tuned-lens's format, via its own ``save``), with
    the translators' tensors on the CPU wherever the lens lives."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    device = lens.layer_translators[0].weight.device
    try:
        move_module(lens.layer_translators, "cpu")
        lens.save(partial)
    finally:
        move_module(lens.layer_translators, device)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "params.pt"):
        (partial / name).replace(folder / name)
    partial.rmdir()


def resolve_pretrained(resource: str) -> Path:
    """A local tuned-lens folder, or the hub resource id fetched into the HF cache."""
    local = Path(resource)
    if (local / "config.json").exists() and (local / "params.pt").exists():
        return local
    if local.exists():
        raise LensspaceError(
            f"lens folder {local} needs config.json and params.pt (tuned-lens format)"
        )
    from tuned_lens.load_artifacts import load_lens_artifacts

    try:
        config_path, _ = load_lens_artifacts(resource)
    except Exception as err:  # hub errors come in many types
        raise LensspaceError(
            f"pretrained lens '{resource}' is neither a local folder nor reachable on the "
            f"tuned-lens hub ({type(err).__name__}). Hub lenses need a connected machine; "
            "offline, use a lens folder or lens.source: train."
        ) from None
    return Path(config_path).parent


# Key spellings found in published lens configs, mapped to tuned-lens 0.2.0's names: lenses
# saved by older tuned-lens versions (e.g. the hub's EleutherAI/pythia-160m-deduped) spell the
# unembedding hash "unemebd_hash".
LENS_CONFIG_ALIASES = {"unemebd_hash": "unembed_hash"}


def read_lens_config(path: Path) -> TunedLensConfig:
    """A lens's ``config.json`` as tuned-lens's config, with the published spellings accepted.

    Keys tuned-lens does not know (other than the aliases) are dropped, as tuned-lens does;
    ``base_model_revision`` and the hash are kept for the checks that compare them.
    """
    try:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise LensspaceError(
            f"lens file {path} is not a readable tuned-lens config ({type(err).__name__}); "
            f"{_rebuild_hint(Path(path))}"
        ) from None
    for alias, name in LENS_CONFIG_ALIASES.items():
        if alias in raw:
            value = raw.pop(alias)
            raw.setdefault(name, value)
    known = set(TunedLensConfig.__dataclass_fields__)
    missing = [key for key in ("d_model", "num_hidden_layers") if key not in raw]
    if missing:
        raise LensspaceError(
            f"lens config {path} lacks {', '.join(missing)} (not a tuned-lens lens?)"
        )
    raw.setdefault("base_model_name_or_path", "")
    return TunedLensConfig(**{k: v for k, v in raw.items() if k in known})


def _translator_count(state: dict, folder: Path) -> int:
    indices = set()
    for key in state:
        index, _, _ = key.partition(".")
        if not index.isdigit():
            raise LensspaceError(
                f"lens {folder}/params.pt holds '{key}', not a translator parameter "
                "('<layer>.weight' / '<layer>.bias')"
            )
        indices.add(int(index))
    return len(indices)


def load_lens(adapter: Adapter, resource: str | Path) -> TunedLens:
    """Load a tuned-lens lens for this model, on its device; parameters with ``weights_only=True``.

    The lens must have one translator per block: a count that differs from the model's (in the
    config or in ``params.pt``) is refused with both counts named.
    """
    folder = resolve_pretrained(str(resource))
    config = read_lens_config(folder / "config.json")
    if config.num_hidden_layers != adapter.n_layers:
        raise LensspaceError(
            f"lens {folder} has {config.num_hidden_layers} layers (config.json num_hidden_layers) "
            f"but the model has {adapter.n_layers} layers: the lens was made for another model"
        )
    if config.d_model != adapter.d_model:
        raise LensspaceError(
            f"lens {folder} is for d_model={config.d_model}; the model has "
            f"d_model={adapter.d_model}"
        )
    state = read_lens_params(folder / "params.pt")
    count = _translator_count(state, folder)
    if count != adapter.n_layers:
        raise LensspaceError(
            f"lens {folder}/params.pt holds {count} translators but the model has "
            f"{adapter.n_layers} layers (and config.json says {config.num_hidden_layers}); "
            f"{_rebuild_hint(folder / 'params.pt')}"
        )
    lens = TunedLens(AdapterUnembed(adapter), config)
    _check_translators(state, lens.layer_translators.state_dict(), folder / "params.pt")
    lens.layer_translators.load_state_dict({k: v.float() for k, v in state.items()})
    return move_module(lens, adapter.device)


def _check_translators(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path
) -> None:
    """The file holds exactly this lens's translator tensors, in their shapes (else one clear
    line)."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise LensspaceError(
            f"lens file {path} does not hold this lens's translators (missing "
            f"{', '.join(missing[:4]) or 'none'}; unexpected "
            f"{', '.join(unexpected[:4]) or 'none'}; "
            f"wrong shape {', '.join(wrong[:4]) or 'none'}); {_rebuild_hint(path)}"
        )


def _rebuild_hint(path: Path) -> str:
    return (
        f"rebuild it with `snakemake --forcerun {path}` if this workflow wrote it, or restore "
        "the lens folder from its source"
    )


def read_lens_params(path: Path) -> dict[str, torch.Tensor]:
    """A lens's translator tensors (loaded with ``weights_only=True``), or one clear error
    naming the file: a truncated or foreign ``params.pt`` never reaches ``load_state_dict``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, pickles of other objects: many types
        raise LensspaceError(
            f"lens file {path} cannot be read ({type(err).__name__}): it is truncated "
            f"or not a tuned-lens params.pt; {_rebuild_hint(path)}"
        ) from None
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise LensspaceError(
            f"lens file {path} holds {type(state).__name__}, not the translators' tensors "
            f"by name; {_rebuild_hint(path)}"
        )
    return state


def check_lens_origin(
    adapter: Adapter, folder: Path, model_names: Iterable[str], allow_other: bool
) -> str:
    """Refuse a lens trained for another model: its unembedding hash (tuned-lens's
    ``unembed_hash``, or the misspelled ``unemebd_hash`` some published lenses carry) must
    match this model's, or, without a hash, its base model name one of ``model_names``.
    ``allow_other`` (the config's ``lens.allow_other_model``) accepts a mismatch; returns
    what was checked, for the log."""
    config = read_lens_config(Path(folder) / "config.json")
    recorded = config.unembed_hash
    base = config.base_model_name_or_path or ""
    names = {n for name in model_names if name for n in (str(name), Path(str(name)).name)}
    if recorded:
        ours = AdapterUnembed(adapter).unembedding_hash()
        matches, what = (
            recorded == ours,
            f"unembedding hash {recorded[:12]}... (this model: {ours[:12]}...)",
        )
    elif base:
        matches, what = (
            bool({base, Path(base).name} & names),
            f"base model '{base}' (this model: {', '.join(sorted(names))})",
        )
    else:
        return f"lens {folder} records neither a base model nor an unembedding hash: not checked"
    if not matches and not allow_other:
        raise LensspaceError(
            f"lens {folder} was trained for another model: {what}; use the lens made for "
            "this model, or set lens.allow_other_model: true in the run if this is intended"
        )
    verdict = "matches" if matches else "differs (allowed by lens.allow_other_model)"
    return f"lens {folder}: {what} {verdict}"


def _positions(x: torch.Tensor) -> torch.Tensor:
    """[n, T, d] -> [n * (T - 1), d]: every evaluated position (position 0 excluded)."""
    return x[:, 1:].reshape(-1, x.shape[-1])


@torch.no_grad()
def evaluate_lens(
    adapter: Adapter,
    lens: TunedLens,
    cache: ActivationCache,
    n_boot: int,
    seed: int,
    chunk: int = 4,
    layers: Sequence[int] | None = None,
) -> list[dict]:
    """Held-out KL(p_final || p_lens) per layer (every one, or ``layers``) for the tuned lens and
    the logit lens.

    Chunks of sequences run outside the layer loop, so the model's own distribution is
    computed once per chunk rather than once per layer.
    """
    final = cache.final("eval")
    layers = list(range(adapter.n_layers)) if layers is None else list(layers)
    hidden = {layer: cache.load(layer, "eval") for layer in layers}
    kls = {(layer, name): [] for layer in layers for name in ("tuned", "logit")}
    for start in tqdm(
        range(0, len(final), chunk), desc="lens eval", file=sys.stderr, mininterval=5
    ):
        reference = KLReference(adapter.logits(final[start : start + chunk, 1:]).log_softmax(-1))
        for layer, h in hidden.items():
            hb = h[start : start + chunk, 1:]
            for name, z in (("tuned", translate(lens, hb, layer)), ("logit", hb)):
                kls[(layer, name)].append(reference.kl(adapter.logits(z)))
    return [
        estimate_row(
            {"layer": layer, "lens": name},
            bootstrap_mean(torch.cat(parts), n_boot=n_boot, seed=seed),
        )
        for (layer, name), parts in kls.items()
    ]


def estimate_row(keys: dict, est: Estimate) -> dict:
    return {**keys, "kl": est.mean, "kl_lo": est.lo, "kl_hi": est.hi, "n_tokens": est.n_tokens}
