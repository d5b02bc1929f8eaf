"""Run a model's blocks from a residual at any layer, with interventions and in any order.

H1 resumes from a cached residual instead of recomputing layers ``0..i-1``; the shuffle
experiment runs blocks in a permuted order. Position handling (rotary embeddings, position
ids, the causal mask) is whatever the model itself passes to its blocks: the runner records
the extra arguments of block 0 once per input shape and replays them, so it needs no
per-family code beyond the :class:`~lensspace.adapter.Adapter`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch

from lensspace.adapter import Adapter

Intervention = Callable[[torch.Tensor], torch.Tensor]


class _Captured(Exception):
    """Raised inside block 0 to stop a forward pass once its arguments are recorded."""


class BlockRunner:
    """Runs blocks of one model on residuals; see :meth:`run`."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self._context: dict[tuple[int, int], tuple[tuple, dict]] = {}

    def block_context(self, batch: int, seq_len: int) -> tuple[tuple, dict]:
        """The positional (after the residual) and keyword arguments the model gives its blocks."""
        key = (batch, seq_len)
        if key not in self._context:
            captured: dict = {}

            def hook(_module, args, kwargs):
                captured["args"], captured["kwargs"] = tuple(args[1:]), dict(kwargs)
                raise _Captured

            device = self.adapter.embed.weight.device
            handle = self.adapter.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
            try:
                self.adapter.model(torch.zeros(batch, seq_len, dtype=torch.long, device=device),
                                   use_cache=False)
            except _Captured:
                pass
            finally:
                handle.remove()
            self._context[key] = (captured["args"], captured["kwargs"])
        return self._context[key]

    @torch.no_grad()
    def run(self, h: torch.Tensor, start: int = 0, order: Sequence[int] | None = None,
            interventions: Mapping[int, Intervention] | None = None) -> torch.Tensor:
        """From residual ``h`` at layer ``start``, run ``order`` (default ``start..L-1``).

        ``interventions[i]`` rewrites the residual at slot ``i`` (the input of the
        ``i``-th block executed counting from layer 0; ``L`` is the final residual) before
        it goes on. Returns the last residual, before the final norm.
        """
        n_layers = self.adapter.n_layers
        order = list(range(start, n_layers)) if order is None else list(order)
        interventions = interventions or {}
        args, kwargs = self.block_context(h.shape[0], h.shape[1])
        for slot, block_index in enumerate(order, start=start):
            if slot in interventions:
                h = interventions[slot](h)
            h = _as_tensor(self.adapter.blocks[block_index](h, *args, **kwargs))
        if start + len(order) in interventions:
            h = interventions[start + len(order)](h)
        return h

    def logits(self, h: torch.Tensor, start: int = 0, order: Sequence[int] | None = None,
               interventions: Mapping[int, Intervention] | None = None) -> torch.Tensor:
        return self.adapter.logits(self.run(h, start, order, interventions))


def _as_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def hooked(adapter: Adapter, layer: int, intervention: Intervention) -> Iterator[None]:
    """During a full forward pass, rewrite the residual entering block ``layer``."""

    def hook(_module, args, kwargs):
        if args:
            return (intervention(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": intervention(kwargs["hidden_states"])}

    handle = adapter.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
