"""Run a model's blocks from a residual at any layer, with interventions and in any order.

H1 resumes from a cached residual instead of recomputing layers ``0..i-1``; the shuffle
experiment runs blocks in a permuted order. Position handling (rotary embeddings, position
ids, the causal mask) is whatever the model itself passes to its blocks: the runner records
the extra arguments of every block once per input shape and replays each block's own (Gemma 2
and 3 give sliding-window and global layers different masks and rotary tables), so it needs
no per-family code beyond the :class:`~lensspace.adapter.Adapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from lensspace.adapter import Adapter

Intervention = Callable[[torch.Tensor], torch.Tensor]


class _Captured(Exception):
    """Raised inside the last block to stop a forward pass once every block's arguments are
    recorded."""


class BlockRunner:
    """Runs blocks of one model on residuals; see :meth:`run`."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter
        self._context: dict[tuple[int, int], list[tuple[tuple, dict]]] = {}

    def block_context(self, batch: int, seq_len: int, block: int = 0) -> tuple[tuple, dict]:
        """The positional (after the residual) and keyword arguments the model gives block
        ``block``."""
        key = (batch, seq_len)
        if key not in self._context:
            captured: dict[int, tuple[tuple, dict]] = {}
            last = self.adapter.n_layers - 1

            def hook_for(index: int):
                def hook(_module, args, kwargs):
                    captured[index] = (tuple(args[1:]), dict(kwargs))
                    if index == last:
                        raise _Captured

                return hook

            device = self.adapter.embed.weight.device
            handles = [
                b.register_forward_pre_hook(hook_for(i), with_kwargs=True)
                for i, b in enumerate(self.adapter.blocks)
            ]
            try:
                self.adapter.model(
                    torch.zeros(batch, seq_len, dtype=torch.long, device=device), use_cache=False
                )
            except _Captured:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            self._context[key] = [captured[i] for i in range(last + 1)]
        return self._context[key][block]

    def call_block(self, block: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``block`` on residual ``h`` with its own recorded arguments."""
        args, kwargs = self.block_context(h.shape[0], h.shape[1], block)
        return _as_tensor(self.adapter.blocks[block](h, *args, **kwargs))

    @torch.no_grad()
    def run(
        self,
        h: torch.Tensor,
        start: int = 0,
        order: Sequence[int] | None = None,
        interventions: Mapping[int, Intervention] | None = None,
    ) -> torch.Tensor:
        """From residual ``h`` at layer ``start``, run ``order`` (default ``start..L-1``).

        ``interventions[i]`` rewrites the residual at slot ``i`` (the input of the
        ``i``-th block executed counting from layer 0; ``L`` is the final residual) before
        it goes on. Returns the last residual, before the final norm.
        """
        n_layers = self.adapter.n_layers
        order = list(range(start, n_layers)) if order is None else list(order)
        interventions = interventions or {}
        for slot, block_index in enumerate(order, start=start):
            if slot in interventions:
                h = interventions[slot](h)
            h = self.call_block(block_index, h)
        if start + len(order) in interventions:
            h = interventions[start + len(order)](h)
        return h

    def logits(
        self,
        h: torch.Tensor,
        start: int = 0,
        order: Sequence[int] | None = None,
        interventions: Mapping[int, Intervention] | None = None,
    ) -> torch.Tensor:
        return self.adapter.logits(self.run(h, start, order, interventions))


def recording(store: dict[int, torch.Tensor], layers: Iterable[int]) -> dict[int, Intervention]:
    """Interventions for :meth:`BlockRunner.run` that keep the residual entering each of ``layers``
    in ``store`` and pass it on unchanged."""

    def keep(layer: int) -> Intervention:
        return lambda h: store.setdefault(layer, h)

    return {layer: keep(layer) for layer in layers}


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
