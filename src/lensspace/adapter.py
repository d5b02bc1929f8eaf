"""The one place that knows where each model family keeps its blocks, norms and embeddings.

Everything else in lensspace talks to an :class:`Adapter`, never to ``model.transformer``
or ``model.model`` directly, so a new family is one entry in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from lensspace.devices import move
from lensspace.errors import LensspaceError


@dataclass(frozen=True)
class Architecture:
    """Attribute paths (dotted, from the causal-LM module) of the parts the study touches."""

    blocks: str
    final_norm: str
    embed: str
    position_embed: str | None
    norm_kind: Literal["layernorm", "rmsnorm"]
    attention: str  # inside a block
    attention_out: str  # inside a block: the projection that writes the heads into the residual
    attention_out_transposed: bool  # GPT-2's Conv1D stores [in, out]
    mlp: str  # inside a block
    mlp_out: str  # inside a block: the down projection; its input is the MLP's neuron activations
    mlp_out_transposed: bool  # GPT-2's Conv1D stores [in, out]


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        position_embed="transformer.wpe",
        norm_kind="layernorm",
        attention="attn",
        attention_out="attn.c_proj",
        attention_out_transposed=True,
        mlp="mlp",
        mlp_out="mlp.c_proj",
        mlp_out_transposed=True,
    ),
    "llama": Architecture(
        blocks="model.layers",
        final_norm="model.norm",
        embed="model.embed_tokens",
        position_embed=None,
        norm_kind="rmsnorm",
        attention="self_attn",
        attention_out="self_attn.o_proj",
        attention_out_transposed=False,
        mlp="mlp",
        mlp_out="mlp.down_proj",
        mlp_out_transposed=False,
    ),
}


def _get_path(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


class Adapter:
    """Uniform access to a causal LM's residual stream, final norm and unembedding.

    Layer ``i`` means ``hidden_states[i]``: the residual that enters block ``i``.
    The final norm is split into :meth:`normalize` (no learned parameters) and
    :meth:`norm_affine` (gain and bias) so that ablations can act between the two.
    """

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise LensspaceError(
                f"model_type '{model_type}' has no architecture adapter; "
                f"supported: {sorted(ARCHITECTURES)} (add one to lensspace.adapter.ARCHITECTURES)"
            )
        self.model = model
        self.model_type: str = model_type
        self.arch = ARCHITECTURES[model_type]
        self.blocks: nn.ModuleList = _get_path(model, self.arch.blocks)
        self.final_norm: nn.Module = _get_path(model, self.arch.final_norm)
        self.embed: nn.Embedding = _get_path(model, self.arch.embed)
        self.position_embed: nn.Embedding | None = (
            _get_path(model, self.arch.position_embed) if self.arch.position_embed else None
        )

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: every tensor the study computes with follows it."""
        return self.embed.weight.device

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the model's device (see :func:`lensspace.devices.move`)."""
        return move(t, self.device)

    @property
    def d_model(self) -> int:
        return self.embed.weight.shape[1]

    @property
    def unembedding(self) -> torch.Tensor:
        """``W_U`` as [vocab, d_model]."""
        return self.model.get_output_embeddings().weight

    @property
    def norm_gain(self) -> torch.Tensor:
        return self.final_norm.weight

    @property
    def norm_bias(self) -> torch.Tensor | None:
        return getattr(self.final_norm, "bias", None)

    @property
    def norm_eps(self) -> float:
        norm = self.final_norm
        return float(norm.eps if hasattr(norm, "eps") else norm.variance_epsilon)

    @property
    def n_heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    def attention(self, layer: int) -> nn.Module:
        return _get_path(self.blocks[layer], self.arch.attention)

    def attention_out(self, layer: int) -> nn.Module:
        return _get_path(self.blocks[layer], self.arch.attention_out)

    def mlp(self, layer: int) -> nn.Module:
        return _get_path(self.blocks[layer], self.arch.mlp)

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP's down projection: its input holds one activation per neuron."""
        return _get_path(self.blocks[layer], self.arch.mlp_out)

    def neuron_out_weights(self, layer: int) -> torch.Tensor:
        """Every MLP neuron's output weight as [n_neurons, d_model]: neuron ``j`` writes ``a_j * W[j]``."""
        weight = self.mlp_out(layer).weight
        return weight if self.arch.mlp_out_transposed else weight.T

    def head_out_weights(self, layer: int) -> torch.Tensor:
        """``W_O`` of every head as [n_heads, head_dim, d_model]: head ``h`` writes ``o_h @ W[h]``."""
        weight = self.attention_out(layer).weight
        weight = weight if self.arch.attention_out_transposed else weight.T  # -> [in, out]
        return weight.reshape(self.n_heads, -1, weight.shape[-1])

    def norm_center(self, z: torch.Tensor) -> torch.Tensor:
        """The final norm's linear step before its scale: centring (LayerNorm) or nothing (RMSNorm)."""
        return z - z.mean(-1, keepdim=True) if self.arch.norm_kind == "layernorm" else z

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """The final norm without its gain and bias: ``u`` with ``norm(z) = g * u + b``."""
        z = z.float()
        if self.arch.norm_kind == "layernorm":
            z = z - z.mean(-1, keepdim=True)
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.norm_eps)

    def norm_affine(self, u: torch.Tensor) -> torch.Tensor:
        out = u * self.norm_gain
        return out + self.norm_bias if self.norm_bias is not None else out

    def logits_from_normalized(self, u: torch.Tensor) -> torch.Tensor:
        return self.norm_affine(u) @ self.unembedding.T

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of a residual taken before the final norm (the model's own head)."""
        return self.logits_from_normalized(self.normalize(z))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embedding plus the position embedding where the family has one."""
        e = self.embed(ids)
        if self.position_embed is not None:
            e = e + self.position_embed(torch.arange(ids.shape[-1], device=ids.device))
        return e

    @contextmanager
    def capture_residuals(self, store: dict[int, torch.Tensor]) -> Iterator[None]:
        """Record the input of every block (layers ``0..L-1``) and of the final norm (``L``).

        ``hidden_states[-1]`` of transformers is after the final norm; the hook on the
        norm's input gives the last residual before it, which is what lenses target.
        """

        def hook_for(index: int):
            def hook(_module, args, kwargs):
                store[index] = args[0] if args else kwargs["hidden_states"]

            return hook

        handles = [
            block.register_forward_pre_hook(hook_for(i), with_kwargs=True)
            for i, block in enumerate(self.blocks)
        ]
        handles.append(
            self.final_norm.register_forward_pre_hook(hook_for(self.n_layers), with_kwargs=True)
        )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
