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
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from tuned_lens.nn import TunedLens

from lensspace.activations import ActivationCache
from lensspace.adapter import Adapter
from lensspace.devices import move
from lensspace.experiments.grid import AblationGrid, CellResults, relative_edit
from lensspace.experiments.h0 import subspace_basis
from lensspace.lenses import fit_affine, translate
from lensspace.runner import BlockRunner
from lensspace.stats import KLReference, bootstrap_mean, kl_loss, kl_target
from lensspace.subspaces import Basis, ablate

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
    """Right singular vectors of ``W_E`` as the residual sees it (any scale or projection), descending."""
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


def mapped_residual(emb_lens: Callable[[torch.Tensor], torch.Tensor], e: torch.Tensor,
                    h: torch.Tensor) -> torch.Tensor:
    """The layer-``i`` residual that blocks run from: ``E_i(e)`` at positions ``1..``, and at
    position 0 the model's own cached ``h`` (the attention sink, whose residual the embedding
    cannot stand in for and which ``E_i`` is not fitted on)."""
    return torch.cat([h[:, :1], emb_lens(e[:, 1:])], dim=1)


TIED_NOTE = ("W_E is tied to W_U: the embedding basis is H0's unembedding basis, "
             "not an independent basis.")


def embeddings_tied(adapter: Adapter) -> bool:
    """Whether ``W_E`` equals ``W_U`` (by value): then H2's embedding basis is H0's unembedding basis."""
    return adapter.embeddings_tied()


def route_logits(runner: BlockRunner, lens: TunedLens, layer: int, h: torch.Tensor,
                 objective: Objective) -> torch.Tensor:
    """Logits of a layer-``layer`` residual ``h`` [n, T, d] by the chosen route."""
    if objective == "lens":
        return runner.adapter.logits(translate(lens, h, layer))
    return runner.logits(h, start=layer)


def fit_embedding_lens(runner: BlockRunner, lens: TunedLens, cache: ActivationCache, layer: int,
                       settings: EmbeddingLensSettings) -> EmbeddingLens:
    """Least squares from the layer-0 residual to layer ``layer``, then KL refinement."""
    e, h = cache.load(0, "train"), cache.load(layer, "train")
    weight, bias = fit_affine(e[:, 1:].reshape(-1, e.shape[-1]), h[:, 1:].reshape(-1, h.shape[-1]),
                              settings.ridge)
    emb_lens = EmbeddingLens(weight, bias)
    if not settings.refine_steps:
        return emb_lens.requires_grad_(False)
    final = cache.final("train")
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.Adam(emb_lens.parameters(), lr=settings.lr)
    for _ in range(settings.refine_steps):
        pick = move(torch.randint(0, len(e), (settings.refine_sequences,), generator=gen), e.device)
        with torch.no_grad():
            target_p, target_p_logp = kl_target(runner.adapter.logits(final[pick, 1:]).log_softmax(-1))
        mapped = mapped_residual(emb_lens, e[pick], h[pick])
        if settings.objective == "lens":
            logits = runner.adapter.logits(translate(lens, mapped[:, 1:], layer))
        else:
            with torch.enable_grad():
                logits = _differentiable_run(runner, mapped, layer)[:, 1:]
        loss = kl_loss(logits, target_p, target_p_logp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"layer {layer}: refined E by the {settings.objective} route, last batch KL {float(loss.detach()):.4f}",
          file=sys.stderr)
    return emb_lens.requires_grad_(False)


def _differentiable_run(runner: BlockRunner, h: torch.Tensor, start: int) -> torch.Tensor:
    """The runner's forward with gradients (the model's weights stay frozen)."""
    for index in range(start, runner.adapter.n_layers):
        h = runner.call_block(index, h)
    return runner.adapter.logits(h)


@torch.no_grad()
def evaluate_layer(runner: BlockRunner, lens: TunedLens, cache: ActivationCache, layer: int,
                   emb_lens: EmbeddingLens, basis: Basis, grid: AblationGrid,
                   chunk: int = 4) -> tuple[dict, CellResults]:
    """Held-out R^2 and route KLs of ``E_layer``, and the input-direction ablation grid."""
    adapter = runner.adapter
    e, h, final = cache.load(0, "eval"), cache.load(layer, "eval"), cache.final("eval")
    mapped = mapped_residual(emb_lens, e, h)
    r2 = r_squared(mapped[:, 1:].reshape(-1, e.shape[-1]), h[:, 1:].reshape(-1, h.shape[-1]))
    mean = cache.load(0, "train")[:, 1:].mean((0, 1))
    cells = grid.variants(adapter.d_model)
    qs = {cell: subspace_basis({basis.name: basis}, grid, layer, cell.subspace, cell.k, cell.basis, cell.draw)
          for cell in cells}
    route_kl = {"lens": [], "downstream": []}
    results = CellResults(layer, grid)
    for start in range(0, len(e), chunk):
        sl = slice(start, start + chunk)
        target = KLReference(adapter.logits(final[sl, 1:]).log_softmax(-1))
        # the lens route's logits are the cells' clean reference too (one head product for both)
        lens_route = route_logits(runner, lens, layer, mapped[sl, 1:], "lens")
        clean = KLReference(lens_route.log_softmax(-1))
        route_kl["lens"].append(target.kl(lens_route))
        downstream = runner.adapter.logits(runner.run(mapped[sl], start=layer)[:, 1:])
        route_kl["downstream"].append(target.kl(downstream))
        for cell in cells:
            edited = ablate(e[sl, 1:], qs[cell], cell.mode, mean)
            logits = adapter.logits(translate(lens, emb_lens(edited), layer))
            results.add(cell, clean.kl(logits), relative_edit(e[sl, 1:], edited))
    fit = {"layer": layer, "r2": r2}
    for objective, parts in route_kl.items():
        est = bootstrap_mean(torch.cat(parts), n_boot=grid.n_boot, seed=grid.seed)
        fit.update({f"kl_{objective}_route": est.mean, f"kl_{objective}_route_lo": est.lo,
                    f"kl_{objective}_route_hi": est.hi})
    fit["n_tokens"] = est.n_tokens
    return fit, results
