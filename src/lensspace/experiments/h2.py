"""H2: embedding lenses ("circuit beginnings").

For layer ``i`` an affine map ``E_i(e) = e + B_i e + c_i`` from the current token's embedding
``e`` (token plus position embedding: exactly the residual at layer 0) to layer ``i``'s
residual, fitted by least squares and refined against the model's own predictions through
one of two routes: ``lens`` (the frozen tuned lens ``T_i`` and the unembedding) or
``downstream`` (``E_i(e)`` replaces ``h_i`` at every position but 0, which keeps the model's
own residual, and the rest of the model runs).
Then directions of ``W_E``'s SVD are ablated at the input of ``E_i``: where do token-input
directions still decide the prediction?
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.devices import move
from lensspace.divergences import KLReference, kl_loss, kl_target
from lensspace.experiments.grid import AblationGrid, CellResults, subspace_basis
from lensspace.head import LinearHead, grid_kls
from lensspace.lenses import fit_affine, translate
from lensspace.runner import BlockRunner
from lensspace.stats import bootstrap_mean
from lensspace.subspaces import Basis

Objective = Literal["lens", "downstream"]


@dataclass(frozen=True)
class EmbeddingLensSettings:
    """Fit and refinement of ``E_i``; ``grid`` is the ablation grid at its input."""

    objective: Objective = "lens"
    ridge: float = 1e-3
    refine_steps: int = 8
    refine_sequences: int = 4
    lr: float = 2e-4
    seed: int = 0


def embedding_basis(adapter: Adapter) -> Basis:
    """Right singular vectors of ``W_E`` as the residual sees it (any scale or projection),
    descending."""
    _, s, vh = torch.linalg.svd(adapter.embedding_matrix.detach().double(), full_matrices=False)
    return Basis("embed", vh.T.float().contiguous(), s.float())


def r_squared(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of the target's total variance (all dimensions) that ``prediction`` explains."""
    target, prediction = target.double(), prediction.double()
    residual = (target - prediction).pow(2).sum()
    total = (target - target.mean(0)).pow(2).sum()
    return float(1 - residual / total)


class EmbeddingLens(torch.nn.Module):
    """``E(e) = e + B e + c`` (the residual parametrisation of tuned lenses)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return e + self.linear(e)


def mapped_residual(
    emb_lens: Callable[[torch.Tensor], torch.Tensor], e: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """The layer-``i`` residual that blocks run from: ``E_i(e)`` at positions ``1..``, and at
    position 0 the model's own cached ``h`` (the attention sink, whose residual the embedding
    cannot stand in for and which ``E_i`` is not fitted on)."""
    return torch.cat([h[:, :1], emb_lens(e[:, 1:])], dim=1)


TIED_NOTE = (
    "W_E is tied to W_U: the embedding basis is H0's unembedding basis, not an independent basis."
)


def embeddings_tied(adapter: Adapter) -> bool:
    """Whether ``W_E`` equals ``W_U`` (by value): then H2's embedding basis is H0's unembedding
    basis."""
    return adapter.embeddings_tied()


def route_logits(
    runner: BlockRunner, lens: TunedLens, layer: int, h: torch.Tensor, objective: Objective
) -> torch.Tensor:
    """Logits of a layer-``layer`` residual ``h`` [n, T, d] by the chosen route."""
    if objective == "lens":
        return runner.adapter.logits(translate(lens, h, layer))
    return runner.logits(h, start=layer)


def fit_embedding_lenses(
    runner: BlockRunner,
    lens: TunedLens,
    cache: ActivationCache,
    layers: Sequence[int],
    settings: EmbeddingLensSettings,
) -> dict[int, EmbeddingLens]:
    """Least squares from the layer-0 residual to each of ``layers``, then KL refinement.

    The refinement runs its steps for all layers at once: every layer draws the same seeded
    batches, so the target distribution of a step is computed once for the job, and each
    layer's lens is exactly what fitting it alone gives.
    """
    e = cache.load(0, "train")
    hs = {layer: cache.load(layer, "train") for layer in layers}
    emb_lenses = {}
    for layer, h in hs.items():
        weight, bias = fit_affine(
            e[:, 1:].reshape(-1, e.shape[-1]), h[:, 1:].reshape(-1, h.shape[-1]), settings.ridge
        )
        emb_lenses[layer] = EmbeddingLens(weight, bias)
    if settings.refine_steps:
        final = cache.final("train")
        gen = torch.Generator().manual_seed(settings.seed)
        opts = {
            layer: torch.optim.Adam(emb_lens.parameters(), lr=settings.lr)
            for layer, emb_lens in emb_lenses.items()
        }
        losses = {}
        for _ in range(settings.refine_steps):
            pick = move(
                torch.randint(0, len(e), (settings.refine_sequences,), generator=gen), e.device
            )
            with torch.no_grad():
                target_p, target_p_logp = kl_target(
                    runner.adapter.logits(final[pick, 1:]).log_softmax(-1)
                )
            for layer, emb_lens in emb_lenses.items():
                mapped = mapped_residual(emb_lens, e[pick], hs[layer][pick])
                if settings.objective == "lens":
                    logits = route_logits(runner, lens, layer, mapped[:, 1:], "lens")
                else:
                    with torch.enable_grad():
                        logits = _differentiable_run(runner, mapped, layer)[:, 1:]
                loss = kl_loss(logits, target_p, target_p_logp)
                opts[layer].zero_grad()
                loss.backward()
                opts[layer].step()
                losses[layer] = float(loss.detach())
        for layer, loss in losses.items():
            print(
                f"layer {layer}: refined E by the {settings.objective} route, last batch KL "
                f"{loss:.4f}",
                file=sys.stderr,
            )
    return {layer: emb_lens.requires_grad_(False) for layer, emb_lens in emb_lenses.items()}


def _differentiable_run(runner: BlockRunner, h: torch.Tensor, start: int) -> torch.Tensor:
    """The runner's forward with gradients (the model's weights stay frozen)."""
    for index in range(start, runner.adapter.n_layers):
        h = runner.call_block(index, h)
    return runner.adapter.logits(h)


def carried_columns(
    lens: TunedLens, emb_lens: EmbeddingLens, layer: int, qs: dict[tuple, torch.Tensor]
) -> dict[tuple, torch.Tensor]:
    """``M q`` per subspace, ``M = (I + A_i)(I + B_i)`` the linear part of ``e -> T_i(E_i(e))``
    (in float64): where an ablation of the embedding lands in lens space."""
    translator = lens.layer_translators[layer]
    eye = torch.eye(
        translator.weight.shape[0], dtype=torch.float64, device=translator.weight.device
    )
    m = (eye + translator.weight.detach().double()) @ (
        eye + emb_lens.linear.weight.detach().double()
    )
    return {key: (m @ q.double()).float() for key, q in qs.items()}


@torch.no_grad()
def evaluate_layers(
    runner: BlockRunner,
    lens: TunedLens,
    cache: ActivationCache,
    emb_lenses: dict[int, EmbeddingLens],
    basis: Basis,
    grid: AblationGrid,
    chunk: int = 4,
) -> dict[int, tuple[dict, CellResults]]:
    """Per layer: held-out R^2 and route KLs of ``E_layer``, and the input-direction ablation grid.

    ``z = T_i(E_i(e))`` is affine in ``e``, so an ablated input's lens vector is ``z`` minus
    ``M q`` times the removed coefficients, and each cell's KL comes from the head's linearity
    (:func:`~lensspace.head.grid_kls`: a rank-k product per subspace, no ``[V, d]``
    work); the clean logits are the lens route's. The model's own distribution, the target of
    both routes, is computed once per chunk for all layers.
    """
    adapter = runner.adapter
    head = LinearHead(adapter)
    e, final = cache.load(0, "eval"), cache.final("eval")
    mean = cache.load(0, "train")[:, 1:].mean((0, 1))
    cells = grid.variants(adapter.d_model)
    mapped, plans, fits = {}, {}, {}
    for layer, emb_lens in emb_lenses.items():
        h = cache.load(layer, "eval")
        mapped[layer] = mapped_residual(emb_lens, e, h)
        fits[layer] = {
            "layer": layer,
            "r2": r_squared(
                mapped[layer][:, 1:].reshape(-1, e.shape[-1]), h[:, 1:].reshape(-1, h.shape[-1])
            ),
        }
        qs = {
            (c.subspace, c.k, c.basis, c.draw): subspace_basis(
                {basis.name: basis}, grid, layer, c.subspace, c.k, c.basis, c.draw
            )
            for c in cells
        }
        plans[layer] = head.plan(
            qs, cells, {"pre_norm": mean}, carried_columns(lens, emb_lens, layer, qs)
        )
    route_kl = {
        (layer, objective): [] for layer in emb_lenses for objective in ("lens", "downstream")
    }
    results = {layer: CellResults(layer, grid) for layer in emb_lenses}
    for start in tqdm(
        range(0, len(e), chunk), desc="H2 evaluation", file=sys.stderr, mininterval=5
    ):
        sl = slice(start, start + chunk)
        target = KLReference(adapter.logits(final[sl, 1:]).log_softmax(-1))
        x = e[sl, 1:]
        shape, d = x.shape[:-1], x.shape[-1]
        for layer in emb_lenses:
            z = translate(lens, mapped[layer][sl, 1:], layer)

            def lens_route(logits: torch.Tensor, layer: int = layer) -> None:
                route_kl[(layer, "lens")].append(target.kl(logits.reshape(*shape, -1).clone()))

            kls = grid_kls(
                head, z.reshape(-1, d), *plans[layer], source=x.reshape(-1, d), on_clean=lens_route
            )
            for cell, (kl, edit) in kls.items():
                results[layer].add(cell, kl.reshape(shape), edit.reshape(shape))
            downstream = adapter.logits(runner.run(mapped[layer][sl], start=layer)[:, 1:])
            route_kl[(layer, "downstream")].append(target.kl(downstream))
    out = {}
    for layer, fit in fits.items():
        for objective in ("lens", "downstream"):
            est = bootstrap_mean(
                torch.cat(route_kl[(layer, objective)]), n_boot=grid.n_boot, seed=grid.seed
            )
            fit.update(
                {
                    f"kl_{objective}_route": est.mean,
                    f"kl_{objective}_route_lo": est.lo,
                    f"kl_{objective}_route_hi": est.hi,
                }
            )
        fit["n_tokens"] = est.n_tokens
        out[layer] = (fit, results[layer])
    return out
