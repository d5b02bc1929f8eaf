"""The one place that knows where each model family keeps its blocks, norms and embeddings.

Everything else in lensspace talks to an :class:`Adapter`, never to ``model.transformer``
or ``model.model`` directly, so a new family is one entry in :data:`ARCHITECTURES`
(keyed by the transformers ``model_type``) and one entry in the tests' ``TINY`` table.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lensspace.devices import move
from lensspace.errors import LensspaceError

ADAPTER_FILE = "src/lensspace/adapter.py"


@dataclass(frozen=True)
class Architecture:
    """Attribute paths (dotted, from the causal-LM module) of the parts the study touches.

    Optional parts are ``None`` where a family lacks them; a path may also resolve to ``None``
    on a model (OPT without a final norm).
    """

    blocks: str
    final_norm: str
    embed: str  # its module's output is the token part of the layer-0 residual (any scale inside)
    norm_kind: Literal["layernorm", "rmsnorm"]
    attention: str  # inside a block
    attention_out: str  # inside a block: the projection that writes the heads into the residual
    attention_out_transposed: bool  # GPT-2's Conv1D stores [in, out]
    mlp: str  # inside a block: the module whose output is the MLP's write into the residual
    mlp_out: str  # inside a block: the down projection; its input is the MLP's neuron activations
    mlp_out_transposed: bool  # GPT-2's Conv1D stores [in, out]
    norm_gain_offset: float = 0.0  # Gemma stores the norm gain as 1 + w
    embed_projection: str | None = None  # OPT-350m: project_in, embedding -> residual width
    head_projection: str | None = None  # OPT-350m: project_out, after the final norm
    logit_softcap: str | None = None  # config attribute: logits = cap * tanh(logits / cap)
    attention_write_norm: str | None = (
        None  # inside a block: RMSNorm applied to the attention output
    )
    mlp_write_norm: str | None = None  # inside a block: a norm applied to the MLP's output
    # The circuit graph's node inputs, inside a block: the norms in front of the attention and the
    # MLP, the projections that make queries, keys and values (three modules, or one fused module
    # laid out as "gpt2": [q | k | v] or "neox": per head [q, k, v]) and the MLP's input
    # projections (Conv1D ``*_transposed`` as above).
    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_layout: Literal["separate", "gpt2", "neox"] = "separate"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_in_transposed: bool = False
    parallel_residual: str | None = None  # config attribute: attention and MLP read one residual
    mlp_compute: tuple[str, ...] = ("mlp",)  # inside a block: the modules that compute the MLP


_LLAMA_LIKE = dict(
    blocks="model.layers",
    final_norm="model.norm",
    embed="model.embed_tokens",
    norm_kind="rmsnorm",
    attention="self_attn",
    attention_out="self_attn.o_proj",
    attention_out_transposed=False,
    mlp="mlp",
    mlp_out="mlp.down_proj",
    mlp_out_transposed=False,
)
_GEMMA2_LIKE = dict(
    _LLAMA_LIKE,
    norm_gain_offset=1.0,
    logit_softcap="final_logit_softcapping",
    attention_write_norm="post_attention_layernorm",
    mlp="post_feedforward_layernorm",
    mlp_write_norm="post_feedforward_layernorm",
    mlp_norm="pre_feedforward_layernorm",
)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        blocks="transformer.h",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        norm_kind="layernorm",
        attention="attn",
        attention_out="attn.c_proj",
        attention_out_transposed=True,
        mlp="mlp",
        mlp_out="mlp.c_proj",
        mlp_out_transposed=True,
        attention_norm="ln_1",
        mlp_norm="ln_2",
        qkv=("attn.c_attn",),
        qkv_layout="gpt2",
        mlp_in=("mlp.c_fc",),
        mlp_in_transposed=True,
    ),
    "gpt_neox": Architecture(
        blocks="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
        norm_kind="layernorm",
        attention="attention",
        attention_out="attention.dense",
        attention_out_transposed=False,
        mlp="mlp",
        mlp_out="mlp.dense_4h_to_h",
        mlp_out_transposed=False,
        qkv=("attention.query_key_value",),
        qkv_layout="neox",
        mlp_in=("mlp.dense_h_to_4h",),
        parallel_residual="use_parallel_residual",
    ),
    "opt": Architecture(
        blocks="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        embed="model.decoder.embed_tokens",
        norm_kind="layernorm",
        attention="self_attn",
        attention_out="self_attn.out_proj",
        attention_out_transposed=False,
        mlp="fc2",
        mlp_out="fc2",
        mlp_out_transposed=False,
        embed_projection="model.decoder.project_in",
        head_projection="model.decoder.project_out",
        attention_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        mlp_in=("fc1",),
        mlp_compute=("fc1", "fc2"),
    ),
    "llama": Architecture(**_LLAMA_LIKE),
    "mistral": Architecture(**_LLAMA_LIKE),
    "qwen2": Architecture(**_LLAMA_LIKE),
    "qwen3": Architecture(**_LLAMA_LIKE),
    "gemma": Architecture(**dict(_LLAMA_LIKE, norm_gain_offset=1.0)),
    "gemma2": Architecture(**_GEMMA2_LIKE),
    "gemma3_text": Architecture(**_GEMMA2_LIKE),
}


def supported_families() -> list[str]:
    return sorted(ARCHITECTURES)


def require_family(model_type: str | None, what: str) -> None:
    """Refuse a ``model_type`` without an adapter entry, naming the families and the file to
    edit."""
    if model_type not in ARCHITECTURES:
        raise LensspaceError(
            f"{what}: model_type '{model_type}' has no architecture adapter; supported: "
            f"{', '.join(supported_families())}. To add a family, add one entry to ARCHITECTURES "
            f"in {ADAPTER_FILE}"
        )


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name)
    return module


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once what it needs is recorded."""


def _eps(norm: nn.Module) -> float:
    return float(norm.eps if hasattr(norm, "eps") else norm.variance_epsilon)


class Adapter:
    """Uniform access to a causal LM's residual stream, final norm and unembedding.

    Layer ``i`` means ``hidden_states[i]``: the residual that enters block ``i``.
    The final norm is split into :meth:`normalize` (no learned parameters) and
    :meth:`norm_affine` (gain and bias) so that ablations can act between the two.
    A family without a final norm (OPT with ``do_layer_norm_before: false``) has
    ``norm_kind == "none"``: both parts are the identity.
    """

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        require_family(model_type, type(model).__name__)
        self.model = model
        self.model_type: str = model_type
        self.arch = ARCHITECTURES[model_type]
        self.blocks: nn.ModuleList = _get_path(model, self.arch.blocks)
        self.final_norm: nn.Module | None = _get_path(model, self.arch.final_norm)
        self.embed: nn.Embedding = _get_path(model, self.arch.embed)
        self.embed_projection: nn.Module | None = self._optional(self.arch.embed_projection)
        self.head_projection: nn.Module | None = self._optional(self.arch.head_projection)
        cap = (
            getattr(model.config, self.arch.logit_softcap, None)
            if self.arch.logit_softcap
            else None
        )
        self.logit_softcap: float | None = float(cap) if cap else None
        self._projected_unembedding: torch.Tensor | None = None

    def _optional(self, path: str | None) -> nn.Module | None:
        return _get_path(self.model, path) if path else None

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
        """Width of the residual stream (OPT-350m's embeddings are narrower)."""
        return int(self.model.config.hidden_size)

    @property
    def norm_kind(self) -> Literal["layernorm", "rmsnorm", "none"]:
        return self.arch.norm_kind if self.final_norm is not None else "none"

    @property
    def output_embedding(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def unembedding(self) -> torch.Tensor:
        """``W_U`` as [vocab, d_model], with any projection after the final norm folded in."""
        weight = self.output_embedding.weight
        if self.head_projection is None:
            return weight
        cached = self._projected_unembedding
        if cached is None or cached.device != weight.device:  # computed again after a move
            with torch.no_grad():
                self._projected_unembedding = (
                    weight.float() @ self.head_projection.weight.float()
                ).contiguous()
        return self._projected_unembedding

    @property
    def unembedding_bias(self) -> torch.Tensor | None:
        return getattr(self.output_embedding, "bias", None)

    @property
    def norm_gain(self) -> torch.Tensor:
        """The final norm's effective gain (``1 + w`` where the family stores it so)."""
        weight = getattr(self.final_norm, "weight", None)
        if weight is None:
            return torch.ones(self.d_model, device=self.unembedding.device)
        return weight + self.arch.norm_gain_offset if self.arch.norm_gain_offset else weight

    @property
    def norm_bias(self) -> torch.Tensor | None:
        return getattr(self.final_norm, "bias", None)

    @property
    def norm_eps(self) -> float:
        return _eps(self.final_norm) if self.final_norm is not None else 0.0

    @property
    def n_heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    def attention(self, layer: int) -> nn.Module:
        return _get_path(self.blocks[layer], self.arch.attention)

    def attention_out(self, layer: int) -> nn.Module:
        return _get_path(self.blocks[layer], self.arch.attention_out)

    def attention_write_norm(self, layer: int) -> nn.Module | None:
        """Gemma 2/3: the RMSNorm between the attention output and the residual."""
        path = self.arch.attention_write_norm
        return _get_path(self.blocks[layer], path) if path else None

    def attention_write_scale(
        self, layer: int, attention_output: torch.Tensor
    ) -> torch.Tensor | float:
        """Per-token divisor of the attention output on its way into the residual (1 without a
        norm)."""
        norm = self.attention_write_norm(layer)
        if norm is None:
            return 1.0
        return torch.sqrt(attention_output.float().pow(2).mean(-1, keepdim=True) + _eps(norm))

    def mlp(self, layer: int) -> nn.Module:
        return _get_path(self.blocks[layer], self.arch.mlp)

    def mlp_write_norm(self, layer: int) -> nn.Module | None:
        """Gemma 2/3: the norm between the MLP's down projection and the residual (a neuron's write
        is then not ``a_j w_j`` alone)."""
        path = self.arch.mlp_write_norm
        return _get_path(self.blocks[layer], path) if path else None

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP's down projection: its input holds one activation per neuron."""
        return _get_path(self.blocks[layer], self.arch.mlp_out)

    def neuron_out_weights(self, layer: int) -> torch.Tensor:
        """Every MLP neuron's output weight as [n_neurons, d_model]: neuron ``j`` writes ``a_j *
        W[j]``."""
        weight = self.mlp_out(layer).weight
        return weight if self.arch.mlp_out_transposed else weight.T

    def neuron_write_directions(self, layer: int) -> torch.Tensor:
        """Each MLP neuron's direction in the residual [n_neurons, d_model]: its output weight,
        times the gain of a norm after the MLP (Gemma 2/3, whose per-token scale aside the write
        lies along ``g * W[j]``)."""
        weight = self.neuron_out_weights(layer)
        norm = self.mlp_write_norm(layer)
        return weight if norm is None else weight * (norm.weight + self.arch.norm_gain_offset)

    def head_out_weights(self, layer: int) -> torch.Tensor:
        """``W_O`` of every head as [n_heads, head_dim, d_model]: head ``h`` writes ``o_h @ W[h]``.

        Where an RMSNorm follows the attention (Gemma 2/3), its gain is folded in, so that with
        ``o_h`` divided by :meth:`attention_write_scale` the heads' writes sum to the residual
        write.
        """
        weight = self.attention_out(layer).weight
        weight = weight if self.arch.attention_out_transposed else weight.T  # -> [in, out]
        norm = self.attention_write_norm(layer)
        if norm is not None:
            weight = weight * (norm.weight + self.arch.norm_gain_offset)
        return weight.reshape(self.n_heads, -1, weight.shape[-1])

    @property
    def n_kv_heads(self) -> int:
        """Key-value heads: fewer than query heads under grouped-query attention."""
        return int(getattr(self.model.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def parallel_residual(self) -> bool:
        """Whether a block's attention and MLP both read the residual entering the block."""
        flag = self.arch.parallel_residual
        return bool(getattr(self.model.config, flag, False)) if flag else False

    @property
    def norms_after_parts(self) -> bool:
        """OPT-350m: the norms follow each attention and MLP, so the residual stream is no sum of
        their writes."""
        return not getattr(self.model.config, "do_layer_norm_before", True)

    def attention_norm(self, layer: int) -> nn.Module:
        """The norm in front of block ``layer``'s queries, keys and values."""
        return _get_path(self.blocks[layer], self.arch.attention_norm)

    def mlp_norm(self, layer: int) -> nn.Module:
        """The norm in front of block ``layer``'s MLP."""
        return _get_path(self.blocks[layer], self.arch.mlp_norm)

    def qkv_modules(self, layer: int) -> list[nn.Module]:
        """The projections making block ``layer``'s queries, keys and values (one if fused)."""
        return [_get_path(self.blocks[layer], path) for path in self.arch.qkv]

    def qkv_weights(self, layer: int) -> tuple[tuple[torch.Tensor, torch.Tensor | None], ...]:
        """``(W [n, e, d], b [n, e] or None)`` for queries (n = heads), keys and values (n =
        key-value heads): head ``h``'s query of a normed residual ``x`` is ``W[h] x + b[h]``."""
        n_heads, n_kv = self.n_heads, self.n_kv_heads
        modules, layout = self.qkv_modules(layer), self.arch.qkv_layout
        if layout == "separate":
            return tuple(
                (
                    module.weight.reshape(n, -1, module.weight.shape[-1]),
                    None if module.bias is None else module.bias.reshape(n, -1),
                )
                for module, n in zip(modules, (n_heads, n_kv, n_kv), strict=True)
            )
        (module,) = modules
        weight = module.weight.T if layout == "gpt2" else module.weight  # [3 * H * e, d]
        bias = module.bias
        if layout == "gpt2":  # [q | k | v], each [H, e]
            w = weight.reshape(3, n_heads, -1, weight.shape[-1])
            b = None if bias is None else bias.reshape(3, n_heads, -1)
            return tuple((w[i], None if b is None else b[i]) for i in range(3))
        w = weight.reshape(n_heads, 3, -1, weight.shape[-1])  # neox: per head [q, k, v]
        b = None if bias is None else bias.reshape(n_heads, 3, -1)
        return tuple((w[:, i], None if b is None else b[:, i]) for i in range(3))

    def qkv_outputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """What :meth:`qkv_modules` output for per-head queries, keys and values [..., n, e]."""
        layout = self.arch.qkv_layout
        if layout == "separate":
            return [q.flatten(-2), k.flatten(-2), v.flatten(-2)]
        if layout == "gpt2":
            return [torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)]
        return [torch.stack([q, k, v], dim=-2).flatten(-3)]

    @contextmanager
    def mlp_skipped(self, layer: int) -> Iterator[None]:
        """Block ``layer``'s MLP computes nothing (its modules return zeros) while inside: for a
        caller that replaces the MLP's write anyway."""
        modules = [_get_path(self.blocks[layer], path) for path in self.arch.mlp_compute]

        def zeros_for(module: nn.Module):
            width = getattr(module, "out_features", None)

            def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                shape = (*x.shape[:-1], width) if width is not None else x.shape
                return x.new_zeros(shape)

            return forward

        for module in modules:
            module.forward = zeros_for(module)
        try:
            yield
        finally:
            for module in modules:
                del module.forward

    def mlp_in_weights(self, layer: int) -> list[torch.Tensor]:
        """The MLP's input projections as [out, d] (gate and up where it has both)."""
        weights = [_get_path(self.blocks[layer], path).weight for path in self.arch.mlp_in]
        return [w.T for w in weights] if self.arch.mlp_in_transposed else weights

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm's centring (LayerNorm subtracts the mean; RMSNorm does not)."""
        return x - x.mean(-1, keepdim=True) if self.norm_kind == "layernorm" else x

    def norm_scale(self, centred: torch.Tensor) -> torch.Tensor:
        """The final norm's divisor ``sqrt(mean(x^2) + eps)`` of a centred vector [..., 1]."""
        if self.norm_kind == "none":
            return torch.ones_like(centred[..., :1])
        return torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.norm_eps)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """The final norm without its gain and bias: ``u`` with ``norm(z) = g * u + b``."""
        z = self.centre(z.float())
        return z / self.norm_scale(z)

    def norm_affine(self, u: torch.Tensor) -> torch.Tensor:
        if self.norm_kind == "none":
            return u
        out = u * self.norm_gain
        return out + self.norm_bias if self.norm_bias is not None else out

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's final-logit soft-cap (Gemma 2): identity where it has none."""
        if self.logit_softcap is None:
            return logits
        return torch.tanh(logits / self.logit_softcap) * self.logit_softcap

    def logits_before_cap(self, u: torch.Tensor) -> torch.Tensor:
        """The head's affine map from the normalised residual ``u`` to the logits, before any
        soft-cap: gain and bias, any projection, the unembedding and its bias."""
        x = self.norm_affine(u)
        if self.head_projection is not None:
            x = self.head_projection(x)
        return self.output_embedding(x)

    def logits_from_normalized(self, u: torch.Tensor) -> torch.Tensor:
        return self.cap_logits(self.logits_before_cap(u))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of a residual taken before the final norm (the model's own head)."""
        return self.logits_from_normalized(self.normalize(z))

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """Token embeddings as the residual sees them, [vocab, d_model]: any scale
        (Gemma's sqrt(d)) and projection (OPT-350m's project_in) applied; no positions."""
        with torch.no_grad():
            ids = torch.arange(self.embed.weight.shape[0], device=self.embed.weight.device)
            rows = self.embed(ids)
            if self.embed_projection is not None:
                rows = self.embed_projection(rows)
        return rows

    def embeddings_tied(self) -> bool:
        """Whether ``W_E`` is ``W_U`` (by value), with no projection on either side, so that
        their SVD bases coincide direction for direction."""
        return (
            self.embed_projection is None
            and self.head_projection is None
            and torch.equal(self.embed.weight, self.output_embedding.weight)
        )

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The layer-0 residual of ``ids``: token embedding plus positions, as the model builds
        it."""
        store: dict[int, torch.Tensor] = {}

        def hook(_module, args, kwargs):
            store[0] = args[0] if args else kwargs["hidden_states"]
            raise StopForward

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(ids, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        return store[0]

    @contextmanager
    def capture_residuals(
        self, store: dict[int, torch.Tensor], stop: bool = False
    ) -> Iterator[None]:
        """Record the input of every block (layers ``0..L-1``) and the last block's output (``L``).

        ``hidden_states[-1]`` of transformers is after the final norm; the last block's output
        is the last residual before it (and before OPT-350m's project_out), which lenses target.
        ``stop``: end the forward pass there with :class:`StopForward` (the caller catches it),
        so the final norm and the unembedding, a fifth of a small model's FLOPs, are not run.
        """

        def hook_for(index: int):
            def hook(_module, args, kwargs):
                store[index] = args[0] if args else kwargs["hidden_states"]

            return hook

        def last(_module, _args, output):
            store[self.n_layers] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise StopForward

        handles = [
            block.register_forward_pre_hook(hook_for(i), with_kwargs=True)
            for i, block in enumerate(self.blocks)
        ]
        handles.append(self.blocks[-1].register_forward_hook(last))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
