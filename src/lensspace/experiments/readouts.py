"""Any readout in place of the unembedding: a masked unembedding, a probe, the model's back half.

A readout maps a residual-space vector to a distribution over its own classes. The study's
machinery takes it as a parameter: its labels are the right singular vectors of its linear map
on the normalised residual, centred over its classes (softmax ignores a shift of every logit),
so the output subspace is where the readout moves its logits most; its fidelity is the held-out
KL between the readout of the model's own state and of the lens's; and the H0 cells ablate its
output, internal and random subspaces in front of it.

- ``masked``: ``W_U`` restricted to a token set built from the tokenizer by a rule; the
  distribution over the set, renormalised. Over every token it *is* the unembedding, and its
  labels are ``unembed_centered``.
- ``probe``: a linear classifier on the normalised final residual, trained here (which corpus a
  token comes from, or whether the next token is in a token set); labels from its weights.
- ``back_half``: blocks ``m..L`` and the unembedding, read from layer ``m``'s residual, with
  lenses trained from each layer ``i < m`` to ``h_m``; labels from the SVD of the back half's
  average Jacobian (the final norm's scale frozen), which is ``W_U``'s own at ``m = L``.
"""

from __future__ import annotations

import keyword
import math
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm

from lensspace.adapter import Adapter
from lensspace.divergences import KLReference, kl_loss, kl_target
from lensspace.errors import LensspaceError
from lensspace.experiments.grid import AblationGrid, CellResults, relative_edit
from lensspace.lenses import fit_affine
from lensspace.robustness import CORRECTION, verdict
from lensspace.runner import BlockRunner
from lensspace.stats import adjust, bootstrap_mean, paired_difference, sign_test_p
from lensspace.subspaces import Basis, ablate, random_subspace

KINDS = ("masked", "probe", "back_half")
TOKEN_SETS = ("all", "digits", "python", "japanese", "capitalised")
PYTHON_OPERATORS = frozenset(
    "+ - * / // % ** @ == != < > <= >= = += -= *= /= //= %= **= -> ( ) [ ] { } : . , ; & | ^ ~ "
    "<< >> := ...".split()
)


# ----------------------------------------------------------------------------- token sets


def _in_set(text: str, rule: str) -> bool:
    word = text.strip()
    if rule == "all":
        return True
    if not word or "\ufffd" in word:  # a piece of a multi-byte character names nothing
        return False
    if rule == "digits":
        return word.isascii() and word.isdigit()
    if rule == "python":
        return keyword.iskeyword(word) or keyword.issoftkeyword(word) or word in PYTHON_OPERATORS
    if rule == "japanese":
        return all(
            "\u3040" <= c <= "\u30ff"  # kana
            or "\u3400" <= c <= "\u4dbf"  # CJK extension A
            or "\u4e00" <= c <= "\u9fff"  # CJK unified ideographs
            or "\uff66" <= c <= "\uff9d"  # half-width katakana
            or c in "、。々〆ー"
            for c in word
        )
    if rule == "capitalised":
        return word.isalpha() and word[0].isupper() and (len(word) == 1 or word[1:].islower())
    raise LensspaceError(f"unknown token set '{rule}': use one of {', '.join(TOKEN_SETS)}")


def token_set(tokenizer, vocab: int, rule: str) -> torch.Tensor:
    """The ids below ``vocab`` whose decoded text (spaces stripped) satisfies ``rule``."""
    if rule == "all":
        return torch.arange(vocab)
    n = min(vocab, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    ids = [i for i, text in enumerate(texts) if _in_set(text, rule)]
    if not ids:
        raise LensspaceError(f"token set '{rule}' is empty for this tokenizer: choose another")
    return torch.tensor(ids)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ReadoutSpec:
    """One declared readout (``readouts.define.<name>``)."""

    name: str
    kind: str
    tokens: str | None = None
    target: str | None = None
    layer: int | None = None

    @classmethod
    def from_params(cls, name: str, spec: dict) -> ReadoutSpec:
        return cls(name, spec["kind"], spec.get("tokens"), spec.get("target"), spec.get("layer"))


@dataclass(frozen=True)
class BackHalfLensTraining:
    """Least squares from ``h_i`` to ``h_m``, then Adam on the KL of the final output through the
    back half, kept only where it lowers that KL on held-out training sequences."""

    ridge: float = 1e-3
    refine_steps: int = 8
    refine_sequences: int = 2
    lr: float = 2e-4
    seed: int = 0


@dataclass(frozen=True)
class ReadoutSettings:
    """One readout's layers and cells, and what its kind needs: the probe's fit, the back
    half's Jacobian sample and lens training."""

    layers: list[int]
    grid: AblationGrid
    test_resamples: int = 1000
    probe_l2: float = 1e-4
    probe_iterations: int = 200
    jacobian_sequences: int = 2
    lens_training: BackHalfLensTraining = BackHalfLensTraining()
    chunk: int = 4

    @classmethod
    def from_params(cls, readout: dict, config: dict, seq_len: int) -> ReadoutSettings:
        """From the rule's ``readout`` param (common.smk's get_readout_settings) and the
        config's ``random_draws``, ``bootstrap`` and ``seed``."""
        probe = readout.get("probe", {"l2": cls.probe_l2, "iterations": cls.probe_iterations})
        back = readout.get("back_half", {"jacobian_sequences": cls.jacobian_sequences})
        training = readout.get("lens_training")
        lens_training = BackHalfLensTraining()
        if training is not None:
            lens_training = BackHalfLensTraining(
                training["ridge"],
                training["refine_steps"],
                max(1, training["refine_batch_tokens"] // seq_len),
                training["lr"],
                training["seed"],
            )
        return cls(
            list(readout["layers"]),
            AblationGrid(
                modes=tuple(readout["modes"]),
                seed=config["seed"],
                n_boot=config["bootstrap"]["n_resamples"],
                random_draws=config["random_draws"],
            ),
            config["bootstrap"]["test_resamples"],
            probe["l2"],
            probe["iterations"],
            back["jacobian_sequences"],
            lens_training,
        )


def readout_layers(spec: ReadoutSpec, layers: list[int]) -> list[int]:
    """The run's readout layers this readout is read at: below ``m`` for a back half."""
    return [i for i in layers if spec.kind != "back_half" or i < spec.layer]


# ----------------------------------------------------------------------------- readouts


class Readout:
    """A map from residuals [n, T, d] to logits [n, T, C] over the readout's classes."""

    name: str
    classes: int
    source_layer: int  # the residual the readout reads: the final one, or the back half's m

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """The readout's linear map on the normalised residual, centred over its classes
        [C, d] (a back half: its average Jacobian); its right singular vectors are the labels."""
        raise NotImplementedError


class MaskedReadout(Readout):
    """The model's head restricted to token ids ``ids`` (renormalised over them)."""

    def __init__(self, adapter: Adapter, name: str, ids: torch.Tensor):
        self.adapter, self.name = adapter, name
        self.ids = ids.to(adapter.unembedding.device)
        self.classes, self.source_layer = len(ids), adapter.n_layers
        weight = adapter.output_embedding.weight
        self.weight = weight.detach()[self.ids].float()
        bias = adapter.unembedding_bias
        self.bias = None if bias is None else bias.detach()[self.ids].float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        a = self.adapter
        y = a.norm_affine(a.normalize(x))
        if a.head_projection is not None:
            y = a.head_projection(y)
        out = y @ self.weight.T
        return a.cap_logits(out if self.bias is None else out + self.bias)

    def matrix(self) -> torch.Tensor:
        w = self.adapter.unembedding.detach().double()[self.ids]
        return (w - w.mean(0, keepdim=True)) * self.adapter.norm_gain.detach().double()


class ProbeReadout(Readout):
    """A linear classifier ``W u + b`` on the normalised residual ``u`` of the final norm."""

    def __init__(self, adapter: Adapter, name: str, weight: torch.Tensor, bias: torch.Tensor):
        self.adapter, self.name = adapter, name
        self.weight, self.bias = weight.float(), bias.float()
        self.classes, self.source_layer = len(weight), adapter.n_layers

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.normalize(x) @ self.weight.T + self.bias

    def matrix(self) -> torch.Tensor:
        w = self.weight.double()
        return w - w.mean(0, keepdim=True)


class BackHalfReadout(Readout):
    """Blocks ``m..L``, the final norm and the unembedding, on a residual at layer ``m``."""

    def __init__(self, adapter: Adapter, name: str, layer: int, jacobian: torch.Tensor | None):
        self.adapter, self.name, self.source_layer = adapter, name, layer
        self.classes = adapter.unembedding.shape[0]
        self.runner = BlockRunner(adapter)
        self.jacobian = jacobian

    def final_residual(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in range(self.source_layer, self.adapter.n_layers):
            h = self.runner.call_block(block, h)
        return h

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(self.final_residual(x))

    def matrix(self) -> torch.Tensor:
        w = self.adapter.unembedding.detach().double()
        head = (w - w.mean(0, keepdim=True)) * self.adapter.norm_gain.detach().double()
        return head @ self.jacobian.double()


def back_half_jacobian(
    readout: BackHalfReadout, h: torch.Tensor, rows_per_pass: int = 32
) -> torch.Tensor:
    """``E_t[ d(h_L[t] / s_t) / d delta ]`` [d, d]: the response of the final residual, divided by
    the final norm's frozen scale ``s_t``, at each position ``t >= 1``, to one shift ``delta`` of
    ``h_m`` at every position ``t >= 1`` (as an ablation edits them all). At ``m = L`` it is
    ``E[1/s] I``, so the labels are ``unembed_centered``'s (whose matrix, like every readout's,
    acts on the normalised residual).

    Computed row by row by reverse mode: the batch ``h`` [n, T, d] is replicated once per row of
    a pass, each replica with its own zero shift, so one backward pass gives ``rows_per_pass``
    rows.
    """
    adapter = readout.adapter
    d = h.shape[-1]
    with torch.no_grad():
        scale = adapter.norm_scale(adapter.centre(readout.final_residual(h)))[:, 1:]
    out = torch.zeros(d, d, dtype=torch.float64)
    for start in tqdm(range(0, d, rows_per_pass), desc="jacobian", file=sys.stderr, mininterval=5):
        rows = torch.arange(start, min(start + rows_per_pass, d))
        with torch.enable_grad():
            delta = torch.zeros(len(rows), d, device=h.device, requires_grad=True)
            shifted = h.unsqueeze(0).expand(len(rows), *h.shape).clone()
            shifted[:, :, 1:] = shifted[:, :, 1:] + delta[:, None, None, :]
            final = readout.final_residual(shifted.reshape(-1, *h.shape[1:]))
            final = final.reshape(len(rows), *h.shape)[:, :, 1:] / scale
            picked = final.mean((1, 2))[torch.arange(len(rows)), rows.to(h.device)]
            (grad,) = torch.autograd.grad(picked.sum(), delta)
        out[rows] = grad.double().cpu()
    return out


def labels(readout: Readout) -> Basis:
    """The readout's basis: right singular vectors of :meth:`Readout.matrix`, descending (a
    readout of fewer classes than dimensions: completed by an orthonormal basis of its null
    space)."""
    matrix = readout.matrix().cpu()
    full = matrix.shape[0] < matrix.shape[1]  # U is then C x C: small
    _, s, vh = torch.linalg.svd(matrix, full_matrices=full)
    values = torch.zeros(vh.shape[0], dtype=torch.float64)
    values[: len(s)] = s
    return Basis(readout.name, vh.T.float().contiguous(), values.float())


def label_rank(basis: Basis, rtol: float = 1e-6) -> int:
    s = basis.singular_values
    return int((s > rtol * s[0]).sum()) if float(s[0]) > 0 else 0


def subspace_size(basis: Basis) -> int:
    """The H0 size for a readout: half its rank (half the residual for a full-rank one, as for
    W_U). Output and internal are the top and the bottom ``k`` of its row space: a readout of C
    classes moves its logits along at most C - 1 directions, and its null space would be an
    internal subspace by construction."""
    return max(1, label_rank(basis) // 2)


def readout_subspaces(rank: int) -> tuple[str, ...]:
    """The cells' subspaces: a rank-1 readout reads one direction, so it has neither an internal
    part of its row space nor a random one to compare with; only its output is ablated."""
    return ("output", "internal", "random") if rank >= 2 else ("output",)


def readout_subspace(
    basis: Basis, rank: int, grid: AblationGrid, layer: int, subspace: str, k: int, draw: int
) -> torch.Tensor:
    """The [d, k] orthonormal basis of one cell: the top ``k`` of the readout's row space
    (output), its bottom ``k`` (internal), or a seeded random ``k``-dim subspace of its row space
    (of the whole residual for a full-rank readout, as H0's control; a random subspace of the
    whole residual would mostly miss a low-rank readout, and lose to its output by
    construction)."""
    if subspace == "output":
        return basis.vectors[:, :k]
    if subspace == "internal":
        return basis.vectors[:, rank - k : rank]
    seed = grid.random_seed(layer, k, "random", draw)
    inside = random_subspace(rank, k, seed, basis.vectors.device)
    return (basis.vectors[:, :rank] @ inside).contiguous()


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(a) and span(b) (orthonormal columns),
    descending."""
    return torch.linalg.svdvals(a.double().T @ b.double()).clamp(0, 1)


def angle_row(basis: Basis, reference: Basis, k: int, seed: int, draws: int = 8) -> dict:
    """The readout's output subspace (top ``k``) against ``W_U``'s (top d/2): mean squared cosine
    of the principal angles, the smallest and largest angle, and the same mean for random
    ``k``-dim subspaces (its expectation is ``(d/2)/d``)."""
    d = basis.vectors.shape[0]
    ours, theirs = basis.vectors[:, :k].cpu(), reference.vectors[:, : d // 2].cpu()
    cos = principal_angles(ours, theirs)
    random = [
        float(principal_angles(random_subspace(d, k, seed + i), theirs).pow(2).mean())
        for i in range(draws)
    ]
    return {
        "readout": basis.name,
        "d_model": d,
        "rank": label_rank(basis),
        "k": k,
        "reference_k": d // 2,
        "mean_cos2": float(cos.pow(2).mean()),
        "random_mean_cos2": sum(random) / len(random),
        "smallest_angle_deg": math.degrees(math.acos(float(cos[0]))),
        "largest_angle_deg": math.degrees(math.acos(float(cos[-1]))),
        "top_singular_value": float(basis.singular_values[0]),
    }


# ----------------------------------------------------------------------------- probes


@dataclass
class ProbeData:
    """Normalised final residuals [N, d] and class labels [N] of one split."""

    u: torch.Tensor
    y: torch.Tensor


def next_token_labels(tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position ``t`` in ``1..T-2`` (a next token exists): whether token ``t + 1`` is in
    ``ids``. Returns (labels [n, T-2], position mask)."""
    member = torch.isin(tokens.long(), ids.long())
    return member[:, 2:].long(), torch.arange(1, tokens.shape[1] - 1)


def fit_probe(
    data: ProbeData, classes: int, l2: float, iterations: int, balanced: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``W u + b`` (L2 ``l2`` on ``W``, mean loss), by L-BFGS in
    float64 from zero. Unweighted, its probabilities are calibrated to the training mix;
    ``balanced`` weighs each class by its inverse frequency (a uniform prior), for classes
    whose mix is a choice of the sample (which corpus a token comes from)."""
    u, y = data.u.double(), data.y.long()
    weight = None
    if balanced:
        counts = torch.bincount(y, minlength=classes).double().clamp_min(1)
        weight = counts.sum() / (classes * counts)
    w = torch.zeros(classes, u.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(u @ w.T + b, y, weight=weight)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float()


def classification_scores(logits: torch.Tensor, y: torch.Tensor, bins: int = 10) -> dict:
    """Accuracy, balanced accuracy, expected calibration error (``bins`` equal-width bins of the
    top probability), Brier score and the majority class's share, of logits [N, C] for labels."""
    p = logits.double().softmax(-1)
    top, pred = p.max(-1)
    right = (pred == y).double()
    classes = p.shape[-1]
    present = [c for c in range(classes) if bool((y == c).any())]
    balanced = sum(float(right[y == c].mean()) for c in present) / len(present)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(top, edges[1:-1])
    ece = sum(
        float((which == i).double().mean())
        * abs(float(right[which == i].mean() - top[which == i].mean()))
        for i in range(bins)
        if bool((which == i).any())
    )
    onehot = torch.nn.functional.one_hot(y.long(), classes).double()
    counts = torch.bincount(y.long(), minlength=classes).double()
    return {
        "accuracy": float(right.mean()),
        "balanced_accuracy": balanced,
        "ece": ece,
        "brier": float((p - onehot).pow(2).sum(-1).mean()),
        "majority_share": float(counts.max() / counts.sum()),
    }


# ----------------------------------------------------------------------------- back-half lenses


def fit_back_half_lens(
    readout: BackHalfReadout,
    h_train: torch.Tensor,
    h_m_train: torch.Tensor,
    final_train: torch.Tensor,
    layer: int,
    settings: BackHalfLensTraining,
) -> tuple[torch.nn.Linear, bool]:
    """A translator ``z = h + A h + b`` from layer ``layer`` to the back half's input (position 0
    excluded from the fit), and whether its KL refinement was kept."""
    d = h_train.shape[-1]
    n_check = max(1, len(h_train) // 4) if settings.refine_steps and len(h_train) > 1 else 0
    fit, check = slice(0, len(h_train) - n_check), slice(len(h_train) - n_check, None)
    weight, bias = fit_affine(
        h_train[fit, 1:].reshape(-1, d), h_m_train[fit, 1:].reshape(-1, d), settings.ridge
    )
    translator = torch.nn.Linear(d, d).to(h_train.device)
    with torch.no_grad():
        translator.weight.copy_(weight)
        translator.bias.copy_(bias)
    if not n_check:
        return translator, False

    def kl(rows: slice) -> float:
        with torch.no_grad():
            target = readout.adapter.logits(final_train[rows, 1:]).log_softmax(-1)
            z = apply_translator(translator, h_train[rows], h_m_train[rows])
            reference = KLReference(target)
            return float(reference.kl(readout.logits(z)[:, 1:]).mean())

    before = kl(check)
    gen = torch.Generator().manual_seed(settings.seed + 7919 * (layer + 1))
    opt = torch.optim.Adam(translator.parameters(), lr=settings.lr)
    n_fit = len(h_train) - n_check
    with torch.enable_grad():
        for _ in range(settings.refine_steps):
            rows = torch.randint(0, n_fit, (min(settings.refine_sequences, n_fit),), generator=gen)
            with torch.no_grad():
                target = kl_target(
                    readout.adapter.logits(final_train[rows, 1:])
                    .log_softmax(-1)
                    .reshape(-1, readout.classes)
                )
            z = apply_translator(translator, h_train[rows], h_m_train[rows])
            out = readout.logits(z)[:, 1:].reshape(-1, readout.classes)
            loss = kl_loss(out, *target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    translator.requires_grad_(False)
    after = kl(check)
    if after >= before:
        with torch.no_grad():
            translator.weight.copy_(weight)
            translator.bias.copy_(bias)
    print(
        f"back half from layer {layer}: KL on {n_check} held-out training sequences "
        f"{before:.4f} after least squares, {after:.4f} after refinement "
        f"({'kept' if after < before else 'reverted'})",
        file=sys.stderr,
    )
    return translator, after < before


def apply_translator(
    translator: torch.nn.Module, h: torch.Tensor, anchor: torch.Tensor
) -> torch.Tensor:
    """``z = h + T(h)`` at positions ``>= 1``; position 0 (the attention sink) is ``anchor``'s,
    the readout's own source residual, untouched."""
    z = h[:, 1:] + translator(h[:, 1:])
    return torch.cat([anchor[:, :1], z], dim=1)


# ----------------------------------------------------------------------------- the experiment


@dataclass
class Views:
    """One corpus's residuals for a readout, each [n, T, d] with position 0 the readout's source
    residual: per layer the named views (``tuned``: the lens; ``identity``: ``h_i`` read as it
    is), the source residual, the model's final residual, and for probes labels and positions."""

    views: dict[int, dict[str, torch.Tensor]]
    source: torch.Tensor
    final: torch.Tensor
    labels: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def fidelity_rows(
    readout: Readout,
    views: Views,
    corpus: str,
    n_boot: int,
    seed: int,
    chunk: int,
) -> list[dict]:
    """Per layer and view: held-out KL(readout(source) || readout(view)) with its bootstrap
    interval over sequences (a back half's ``logit`` view: the model's own head on ``h_i``, the
    logit lens); a probe's scores per view; a masked readout's set mass under the whole head.
    The ``model`` row is the readout of the source against the model's own output read the same
    way (a back half: the model's head on its final residual; 0 for the others by definition).
    The reference distribution is computed once per chunk of sequences."""
    adapter = readout.adapter
    back_half = isinstance(readout, BackHalfReadout)
    # (layer, view name, residuals, how they are read)
    compared = [
        (layer, view, x, readout.logits)
        for layer, named in views.views.items()
        for view, x in named.items()
    ]
    if back_half:
        compared += [
            (layer, "logit", named["identity"], adapter.logits)
            for layer, named in views.views.items()
        ]
    final = adapter.logits if back_half else readout.logits
    compared.append((readout.source_layer, "model", views.final, final))
    kls: list[list[torch.Tensor]] = [[] for _ in compared]
    with torch.no_grad():
        for s in range(0, len(views.source), chunk):
            ref = KLReference(readout.logits(views.source[s : s + chunk])[:, 1:].log_softmax(-1))
            for parts, (_, _, x, read) in zip(kls, compared):
                parts.append(ref.kl(read(x[s : s + chunk])[:, 1:]))

    def scores(x: torch.Tensor, view: str) -> dict:
        out: dict[str, Any] = {}
        if views.labels is not None:
            with torch.no_grad():
                logits = readout.logits(x)[:, views.positions]
            out.update(
                classification_scores(logits.reshape(-1, readout.classes), views.labels.reshape(-1))
            )
        if isinstance(readout, MaskedReadout) and view in ("tuned", "model"):
            out["set_mass"] = set_mass(readout, x, chunk)
        return out

    rows = []
    for parts, (layer, view, x, _) in zip(kls, compared):
        est = bootstrap_mean(torch.cat(parts), n_boot=n_boot, seed=seed)
        keys = {"readout": readout.name, "corpus": corpus, "layer": layer, "view": view}
        values = {"kl": est.mean, "kl_lo": est.lo, "kl_hi": est.hi, "n_tokens": est.n_tokens}
        shown = views.source if view == "model" else x
        rows.append({**keys, **values, **scores(shown, view)})  # a back half has no scores
    return rows


def set_mass(readout: MaskedReadout, x: torch.Tensor, chunk: int) -> float:
    """Mean probability the whole head gives the readout's token set, at positions >= 1."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(x), chunk):
            p = readout.adapter.logits(x[s : s + chunk, 1:]).softmax(-1)
            total += float(p[..., readout.ids].sum(-1).double().sum())
            count += p.shape[0] * p.shape[1]
    return total / count


def cell_results(
    readout: Readout,
    basis: Basis,
    z_eval: torch.Tensor,
    z_mean: torch.Tensor,
    layer: int,
    grid: AblationGrid,
    chunk: int,
) -> CellResults:
    """The H0 cells of one readout at one layer: KL(readout(z) || readout(z')) per token, with
    ``z'`` the ablation of a subspace of the readout's labels (:func:`readout_subspace`) at
    positions >= 1, toward the training mean ``z_mean`` in mean mode; position 0 untouched."""
    rank = label_rank(basis)
    cells = grid.variants(z_eval.shape[-1])
    qs = {
        c: readout_subspace(basis, rank, grid, layer, c.subspace, c.k, c.draw).to(z_eval.device)
        for c in cells
    }
    results = CellResults(layer, grid)
    with torch.no_grad():
        for s in range(0, len(z_eval), chunk):
            z = z_eval[s : s + chunk]
            reference = KLReference(readout.logits(z)[:, 1:].log_softmax(-1))
            for cell in cells:
                edited = ablate(z[:, 1:], qs[cell], cell.mode, z_mean)
                x = torch.cat([z[:, :1], edited], dim=1)
                kl = reference.kl(readout.logits(x)[:, 1:])
                results.add(cell, kl, relative_edit(z[:, 1:], edited))
    return results


VERDICT_COLUMNS = [
    "readout",
    "layer",
    "mode",
    "comparison",
    "diff",
    "lo",
    "hi",
    "median",
    "n_above",
    "n_below",
    "p_value",
    "n_sequences",
    "output_kl",
    "draw_min",
    "draw_max",
    "p_adjusted",
    "verdict",
]  # verdicts.tsv, also where a rank-1 readout has no comparison to make


def verdict_rows(results: list[CellResults], name: str, n_resamples: int, seed: int) -> list[dict]:
    """Per layer and mode: output - internal and output - random (the draws' mean) per sequence.
    The exact sign test gives the p-value, Holm-corrected over the readout's comparisons, and the
    direction (more sequences above 0 than below); against random the output's mean KL must also
    lie beyond every draw's. Beside them: the mean difference with its paired bootstrap-t
    interval, and the median."""
    rows = []
    for res in results:
        per_seq = {cell: torch.cat(parts).mean(1) for cell, parts in res.kl.items()}
        for mode in res.grid.modes:

            def of(subspace: str) -> list[torch.Tensor]:
                return [v for c, v in per_seq.items() if c.subspace == subspace and c.mode == mode]

            output = torch.stack(of("output")).mean(0)
            for other in ("internal", "random"):
                if not of(other):
                    continue
                draws = torch.stack(of(other))
                diff = output - draws.mean(0)
                comp = paired_difference(output, draws.mean(0), n_resamples, seed)
                draw_means = draws.mean(1)
                rows.append(
                    {
                        "readout": name,
                        "layer": res.layer,
                        "mode": mode,
                        "comparison": f"output - {other}",
                        "diff": comp.diff,
                        "lo": comp.lo,
                        "hi": comp.hi,
                        "median": float(diff.median()),
                        "n_above": int((diff > 0).sum()),
                        "n_below": int((diff < 0).sum()),
                        "p_value": sign_test_p(diff),
                        "n_sequences": len(diff),
                        "output_kl": float(output.mean()),
                        "draw_min": float(draw_means.min()) if other == "random" else math.nan,
                        "draw_max": float(draw_means.max()) if other == "random" else math.nan,
                    }
                )
    for row, p in zip(rows, adjust([r["p_value"] for r in rows], CORRECTION)):
        row["p_adjusted"] = p
        against_draws = row["comparison"] == "output - random"
        row["verdict"] = verdict(
            row["n_above"] - row["n_below"],
            p,
            row["output_kl"] if against_draws else None,
            row["draw_min"] if against_draws else None,
            row["draw_max"] if against_draws else None,
        )
    return rows


# ----------------------------------------------------------------------------- one job


@torch.no_grad()
def corpus_residuals(
    adapter: Adapter, tokens: dict[str, torch.Tensor], layers: list[int], batch: int = 8
) -> dict[str, torch.Tensor]:
    """``{"<split>.<layer>": residuals [n, T, d]}`` of an eval corpus at ``layers`` (``L``: before
    the final norm), and ``"<split>.tokens"``."""
    from lensspace.activations import residuals

    out: dict[str, torch.Tensor] = {}
    for split, ids in tokens.items():
        parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        for s in range(0, len(ids), batch):
            hs = residuals(adapter, adapter.to_device(ids[s : s + batch].long()))
            for layer in layers:
                parts[layer].append(hs[layer].float().cpu())
        for layer in layers:
            out[f"{split}.{layer}"] = torch.cat(parts[layer]).contiguous()
        out[f"{split}.tokens"] = ids.to(torch.int32).contiguous()
    return out


@dataclass
class Corpus:
    """One corpus's residuals by split and layer, and its tokens by split."""

    name: str
    residual: Any  # (layer, split) -> [n, T, d]
    tokens: dict[str, torch.Tensor]


@dataclass
class ReadoutResult:
    """The TSV rows of one readout."""

    fidelity: list[dict]
    ablation: list[dict]
    verdicts: list[dict]
    summary: dict


def _probe_split(
    spec: ReadoutSpec,
    corpora: list[Corpus],
    split: str,
    source: int,
    ids: torch.Tensor | None,
    normalize,
) -> tuple[ProbeData, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A probe's data of ``split``: pooled, and per corpus (labels [n, P], positions [P])."""
    us, ys, per = [], [], {}
    for index, corpus in enumerate(corpora):
        if spec.target == "next_token" and index and split == "train":
            continue  # the next-token probe is trained on the run's own corpus only
        tokens = corpus.tokens[split]
        if spec.target == "corpus":
            positions = torch.arange(1, tokens.shape[1])
            labels = torch.full((len(tokens), len(positions)), index, dtype=torch.long)
        else:
            labels, positions = next_token_labels(tokens, ids)
        per[corpus.name] = (labels, positions)
        if spec.target == "next_token" and index:
            continue  # read on the other corpora, never pooled with the run's own
        h = corpus.residual(source, split)[:, positions]
        us.append(normalize(h).reshape(-1, h.shape[-1]).cpu())
        ys.append(labels.reshape(-1))
    return ProbeData(torch.cat(us), torch.cat(ys)), per


def build_readout(
    adapter: Adapter,
    tokenizer,
    spec: ReadoutSpec,
    corpora: list[Corpus],
    settings: ReadoutSettings,
) -> tuple[Readout, dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The readout of ``spec`` (a probe trained, a back half's Jacobian computed), facts for its
    summary row, and a probe's held-out labels per corpus."""
    own = corpora[0]
    vocab = adapter.unembedding.shape[0]
    if spec.kind == "masked":
        ids = token_set(tokenizer, vocab, spec.tokens)
        return MaskedReadout(adapter, spec.name, ids), {"classes": len(ids)}, {}
    if spec.kind == "probe":
        ids = token_set(tokenizer, vocab, spec.tokens) if spec.target == "next_token" else None
        if spec.target == "corpus" and len(corpora) < 2:
            raise LensspaceError(
                f"readouts.define.{spec.name}: a corpus probe needs the run's eval_corpora "
                "(the classes are the run's corpus and each eval corpus); add one"
            )
        train, _ = _probe_split(spec, corpora, "train", adapter.n_layers, ids, adapter.normalize)
        test, per = _probe_split(spec, corpora, "eval", adapter.n_layers, ids, adapter.normalize)
        classes = len(corpora) if spec.target == "corpus" else 2
        weight, bias = fit_probe(
            train,
            classes,
            settings.probe_l2,
            settings.probe_iterations,
            balanced=spec.target == "corpus",
        )
        readout = ProbeReadout(
            adapter, spec.name, weight.to(adapter.device), bias.to(adapter.device)
        )
        scores = classification_scores(test.u.float() @ weight.T + bias, test.y)
        fit = classification_scores(train.u.float() @ weight.T + bias, train.y)
        return (
            readout,
            {
                "classes": classes,
                "train_accuracy": fit["accuracy"],
                **{f"heldout_{k}": v for k, v in scores.items()},
                "n_train": len(train.y),
                "n_heldout": len(test.y),
            },
            per,
        )
    readout = BackHalfReadout(adapter, spec.name, spec.layer, None)
    h = own.residual(spec.layer, "train")[: settings.jacobian_sequences]
    halves = [h[: len(h) // 2], h[len(h) // 2 :]] if len(h) > 1 else [h]
    parts = [back_half_jacobian(readout, half) for half in halves]
    readout.jacobian = sum(len(half) * j for half, j in zip(halves, parts)) / len(h)
    facts = {"classes": vocab, "jacobian_tokens": h[:, 1:].shape[0] * h[:, 1:].shape[1]}
    if len(parts) == 2:
        facts["jacobian_split_half_cos2"] = split_half_agreement(readout, parts)
    return readout, facts, {}


def split_half_agreement(readout: BackHalfReadout, parts: list[torch.Tensor]) -> float:
    """Mean squared cosine of the principal angles between the output subspaces (top half of
    the rank) of the labels from each half of the Jacobian's sequences: 1 = the sample pins
    the labels down; ``1/2`` = no better than chance."""
    bases = []
    for jacobian in parts:
        half = BackHalfReadout(readout.adapter, readout.name, readout.source_layer, jacobian)
        bases.append(labels(half))
    k = subspace_size(bases[0])
    return float(principal_angles(bases[0].vectors[:, :k], bases[1].vectors[:, :k]).pow(2).mean())


def definition(spec: ReadoutSpec, n_layers: int) -> str:
    """A readout in words, for its tables."""
    if spec.kind == "masked":
        return f"W_U over {spec.tokens} tokens"
    if spec.kind == "probe":
        return "which corpus" if spec.target == "corpus" else f"next token {spec.tokens}?"
    return f"blocks {spec.layer}..{n_layers - 1} and W_U"


def run_readout(
    adapter: Adapter,
    tokenizer,
    lens,
    spec: ReadoutSpec,
    corpora: list[Corpus],
    reference: Basis,
    settings: ReadoutSettings,
) -> ReadoutResult:
    """Everything one readout reports. ``corpora[0]`` is the run's own: its train split fits the
    probe, the back-half lenses and the means, its eval split carries the H0 cells (a corpus
    probe's cells: every corpus's eval split, so every class is read); every corpus's eval
    split is read for fidelity (a back half's: the run's own only)."""
    from lensspace.lenses import translate

    readout, facts, probe_labels = build_readout(adapter, tokenizer, spec, corpora, settings)
    basis = labels(readout)
    k = subspace_size(basis)
    grid = replace(
        settings.grid,
        subspaces=readout_subspaces(label_rank(basis)),
        ks=(k,),
        bases=(basis.name,),
        sites=("pre_norm",),
        experiment=f"readouts/{spec.name}",
    )
    layers = readout_layers(spec, settings.layers)
    if not layers:
        raise LensspaceError(
            f"readouts.define.{spec.name}: none of its layers {settings.layers} lies below its "
            f"layer {spec.layer}; name one in its layers"
        )
    own = corpora[0]
    source = readout.source_layer
    translators, kept = {}, {}
    if spec.kind == "back_half":
        for layer in layers:
            translators[layer], kept[layer] = fit_back_half_lens(
                readout,
                own.residual(layer, "train"),
                own.residual(source, "train"),
                own.residual(adapter.n_layers, "train"),
                layer,
                settings.lens_training,
            )

    def view(layer: int, split: str, corpus: Corpus, tuned: bool = True) -> torch.Tensor:
        """Position 0 the source residual's, the others the lens's (or ``h_i`` itself)."""
        h, anchor = corpus.residual(layer, split), corpus.residual(source, split)
        with torch.no_grad():
            if tuned and spec.kind == "back_half":
                return apply_translator(translators[layer], h, anchor)
            rest = translate(lens, h[:, 1:], layer) if tuned else h[:, 1:]
            return torch.cat([anchor[:, :1], rest], dim=1)

    fidelity = []
    # a back half is read on the run's own corpus only: each view reruns its blocks and head
    for corpus in corpora[:1] if spec.kind == "back_half" else corpora:
        labels_, positions = probe_labels.get(corpus.name, (None, None))
        views = Views(
            {
                layer: {
                    "tuned": view(layer, "eval", corpus),
                    "identity": view(layer, "eval", corpus, False),
                }
                for layer in layers
            },
            corpus.residual(source, "eval"),
            corpus.residual(adapter.n_layers, "eval"),
            None if labels_ is None else labels_.to(adapter.device),
            positions,
        )
        fidelity += fidelity_rows(
            readout, views, corpus.name, grid.n_boot, grid.seed, settings.chunk
        )
    read = corpora if spec.target == "corpus" else corpora[:1]
    results, ablation = [], []
    for layer in tqdm(layers, desc=f"readout {spec.name}", file=sys.stderr, mininterval=5):
        # a corpus probe's mean: each corpus's mean weighted alike, as its classes are
        z_mean = torch.stack([view(layer, "train", c)[:, 1:].mean((0, 1)) for c in read]).mean(0)
        z_eval = torch.cat([view(layer, "eval", c) for c in read])
        res = cell_results(readout, basis, z_eval, z_mean, layer, grid, settings.chunk)
        results.append(res)
        ablation += [{"readout": spec.name, **row} for row in res.rows()]
    verdicts = verdict_rows(results, spec.name, settings.test_resamples, grid.seed)
    summary = {
        **angle_row(basis, reference, k, grid.seed),
        "kind": spec.kind,
        "definition": definition(spec, adapter.n_layers),
        "cells_on": ",".join(c.name for c in read),
        **facts,
        "refinement_kept": ",".join(str(layer) for layer, kept_ in kept.items() if kept_),
    }
    return ReadoutResult(fidelity, ablation, verdicts, summary)
