"""Decoder-only transformer: pre-norm blocks of grouped-query attention and a SwiGLU MLP (or MoE), then the model.

The layers (RMSNorm, rotary, attention, MLP) live in :mod:`llm.models.layers` and are re-exported here; this file
reads top-down: block -> model. Module and parameter names follow the Hugging Face Llama layout (``embed_tokens``,
``layers.{i}.self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``) so that weight
conversion in :mod:`llm.models.hf` is a key map. With ``use_moe`` every block's ``mlp`` is a
:class:`~llm.models.moe.MoELayer`.

Both take a :class:`~llm.models.config.ModelConfig` or its fields as keywords (``DecoderModel(config)`` ==
``DecoderModel(**asdict(config))``); ``model.config`` is the resolved ModelConfig. The model returns plain logits;
the loss belongs to the task. MoE auxiliary losses of the last forward are available as ``model.aux_loss`` (or
:func:`~llm.models.hooks.aux_loss` on any module). What a training engine needs without knowing this class:
``fsdp_units()``, ``flops_per_token(seq_len)``, ``num_parameters()``, and the per-step hooks its layers implement
(:mod:`llm.models.hooks`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from llm.models import flops, hooks, masks, recompute
from llm.models.config import ModelConfig, build_config, default_intermediate_size
from llm.models.generation import GenerationMixin, KVCache, LayerKVCache
from llm.models.layers import MLP, Attention, RMSNorm, RotaryEmbedding, apply_rotary, causal_mask, rotate_half
from llm.models.moe import MoELayer
from llm.models.presets import TINY

__all__ = [
    "MLP",
    "Attention",
    "DecoderModel",
    "ModelConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerBlock",
    "apply_rotary",
    "causal_mask",
    "default_intermediate_size",
    "rotate_half",
]

INIT_STD = 0.02


# --------------------------------------------------------------------------------------------------------- block
class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); the MLP is an MoE layer when ``use_moe``.

    ``TransformerBlock(config, causal=...)`` or ``TransformerBlock(hidden_size=..., num_heads=..., ...)`` (fields
    of ``ModelConfig``; the model-level ones such as ``vocab_size`` are accepted and unused). ``num_layers`` only
    sets the init scale of the residual output projections (1/sqrt(2*num_layers)). ``activation_checkpointing``
    is a recomputation mode of :mod:`llm.models.recompute` (``"none"``, ``"full"``: the whole block's activations
    are recomputed in backward, ``"selective"``: all but the matmul and attention outputs; ``True`` means full):
    only when grad is on and no KV cache is used.
    """

    activation_checkpointing: str | bool = "none"

    def __init__(self, config: ModelConfig | None = None, /, *, causal: bool = True, **fields: Any) -> None:
        super().__init__()
        c = build_config(config, fields, "TransformerBlock")
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.self_attn = Attention(c, causal)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.norm_eps)
        self.mlp: nn.Module = MoELayer.from_config(c) if c.use_moe else MLP(c.hidden_size, c.intermediate_size)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.init_weights(c.num_layers, zero_output=c.zero_init_output)

    def init_weights(self, num_layers: int = 1, std: float = INIT_STD, zero_output: bool = False) -> None:
        """Normal(0, std) everywhere; projections writing into the residual stream get std/sqrt(2*num_layers)
        so the residual variance does not grow with depth (GPT-2 / nanoGPT), or zero with ``zero_output``
        (``model.zero_init_output``: each block starts as the identity, as in modded-nanogpt; their gradients are
        not zero, since their inputs are not, so they train from the first step)."""
        resid_std = 0.0 if zero_output else std / math.sqrt(2 * num_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's QK-norm starts as the identity
                nn.init.ones_(p)
            elif name.endswith(".bias"):  # Qwen2's q/k/v biases start at zero
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                nn.init.normal_(p, std=resid_std) if resid_std else nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        mode = self.activation_checkpointing
        if mode and mode != "none" and cache is None and torch.is_grad_enabled():
            return recompute.run_block(self._forward, mode, x, cos, sin, attn_mask, None)
        return self._forward(x, cos, sin, attn_mask, cache)

    def _forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, cache: LayerKVCache | None
    ) -> Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache))  # (B, T, H)
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))  # (B, T, H)


def _block_config(c: ModelConfig, index: int) -> ModelConfig:
    """Block ``index``'s config: ``c``, or ``c`` with a dense MLP where ``c.is_moe_layer`` says so (Qwen3-MoE's
    ``decoder_sparse_step`` / ``mlp_only_layers``); a plain MoE config is returned as is."""
    return c if c.is_moe_layer(index) or not c.use_moe else dataclasses.replace(c, use_moe=False)


# --------------------------------------------------------------------------------------------------------- model
class DecoderModel(GenerationMixin, nn.Module):
    """Token embedding -> ``num_layers`` TransformerBlocks -> final RMSNorm -> LM head (optionally tied).

    ``DecoderModel(config)`` or ``DecoderModel(vocab_size=..., hidden_size=..., ...)``: the keywords are the
    ``ModelConfig`` field names (unset ones take ModelConfig's defaults); with a config, keywords override its
    values. Derived defaults: ``num_kv_heads = num_heads``; ``intermediate_size`` = Llama's 8/3*hidden rounded up
    to a multiple of ``intermediate_multiple_of`` (256); ``moe_intermediate_size = intermediate_size``. Named shapes:
    :meth:`from_preset`. ``causal=False`` gives bidirectional attention for non-LM tasks.
    """

    def __init__(self, config: ModelConfig | None = None, /, *, causal: bool = True, **fields: Any) -> None:
        super().__init__()
        self.config: ModelConfig = build_config(config, fields, "DecoderModel")
        c = self.config
        self.causal = causal
        self.max_seq_len = c.max_seq_len
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(TransformerBlock(_block_config(c, i), causal=causal) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(c.head_dim, c.max_seq_len, c.rope_theta,
                                      scaling=c if c.rope_type != "default" else None)
        nn.init.normal_(self.embed_tokens.weight, std=INIT_STD)
        nn.init.normal_(self.lm_head.weight, std=INIT_STD)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def tiny(cls, **overrides: Any) -> DecoderModel:
        """The preset tests use: a few thousand parameters, GQA (4 heads, 2 KV heads), 2 layers."""
        return cls(**{**TINY, **overrides})

    @classmethod
    def from_preset(cls, name: str, /, *, causal: bool = True, **overrides: Any) -> DecoderModel:
        """The named shape of :mod:`llm.models.presets` (``smollm2-135m``, ``tinyllama-1.1b``, ``llama-3.2-1b``,
        ``mixtral-8x7b``, ``tiny``, ...) with ``overrides`` (ModelConfig fields) replacing its values. Build under
        ``torch.device("meta")`` to size a large one without allocating it."""
        return cls(ModelConfig.from_preset(name, **overrides), causal=causal)

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Tensor], config: ModelConfig | None = None, /, **kwargs: Any
    ) -> DecoderModel:
        """Build on the meta device (no random init) and adopt ``state``'s tensors, device and dtype as they are.

        ``config`` / ``kwargs`` as for the constructor. A tied model needs only one of ``embed_tokens.weight`` /
        ``lm_head.weight`` (a safetensors file keeps one).
        """
        with torch.device("meta"):
            model = cls(config, **kwargs)
        state = dict(state)
        if model.config.tie_embeddings:
            tied = state.get("embed_tokens.weight", state.get("lm_head.weight"))
            if tied is not None:
                state.setdefault("embed_tokens.weight", tied)
                state.setdefault("lm_head.weight", tied)
        model.load_state_dict(state, strict=True, assign=True)
        if model.config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        # Tensors that are not in the state_dict were created on meta; rebuild them where the weights live.
        device = model.embed_tokens.weight.device
        model.rotary.inv_freq = model.rotary._inv_freq(device)
        for m in model.modules():
            if isinstance(m, MoELayer):
                m.tokens_per_expert = torch.zeros(m.num_experts, dtype=torch.long, device=device)
                if m.routing_bias.is_meta:  # not saved unless the model balances by routing bias (aux_free)
                    m.routing_bias = torch.zeros(m.num_experts, device=device)
        return model

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the last forward's MoE auxiliary losses (already times their coefficients); None if dense."""
        return hooks.aux_loss(self)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab) of ``input_ids`` (B, T) or ``inputs_embeds`` (B, T, hidden).

        ``attention_mask`` (B, S) marks real (1/True) vs padding (0) keys, S = cached + T. ``positions`` (T,)
        defaults to cached + arange(T). ``cache`` enables incremental decoding (see :meth:`generate`).
        ``return_hidden`` returns the final-norm hidden states (B, T, hidden) instead of logits, for fused or
        chunked output-layer losses. ``document_ids`` (B, T) integer: several documents packed in a row (equal id =
        one document, a contiguous run); each attends only within itself, causally, and its rotary positions
        restart at 0 (`llm.models.masks`; not with ``cache``).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        T = x.shape[1]
        start = cache.length if cache is not None else 0
        if document_ids is not None:
            if cache is not None:
                raise ValueError("document_ids cannot be combined with a KV cache: generation decodes one document")
            document_ids = masks.check_document_ids(document_ids, (x.shape[0], T)).to(x.device)
            if positions is None:
                positions = masks.document_positions(document_ids)  # (B, T): 0 at each document's start
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device)
        cos, sin = self.rotary(positions)  # (T, head_dim) each, or (B, T, head_dim) for per-row positions
        if cos.ndim == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, head_dim): broadcast over the heads
        if document_ids is None:
            attn_mask = self._attention_mask(attention_mask, T, start + T, x.device)
        else:
            attn_mask = self._document_mask(document_ids, attention_mask)
        x = self.embed_dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, cache.layers[i] if cache is not None else None)  # (B, T, H)
        x = self.norm(x)  # (B, T, H)
        return x if return_hidden else self.logits(x)  # (B, T, vocab)

    def logits(self, hidden: Tensor) -> Tensor:
        """The output head on final-norm ``hidden`` states: ``lm_head``, then ``model.logit_softcap``'s
        ``cap * tanh(logits / cap)`` where set (generation reads these logits too). A loss fused with the head
        (``return_hidden`` + `llm.models.loss.linear_cross_entropy`) computes plain ``lm_head`` logits: with a cap
        set, compute the loss on these instead."""
        logits = self.lm_head(hidden)  # (B, T, vocab)
        cap = self.config.logit_softcap
        # In fp32: under bf16 autocast the tanh of large logits would round to a handful of values.
        return cap * torch.tanh(logits.float() / cap) if cap else logits

    def _attention_mask(self, padding: Tensor | None, q_len: int, k_len: int, device: torch.device) -> Tensor | None:
        """Combine a (B, S) key-padding mask with the causal rule into a (B, 1, T, S) bool mask (None: no padding,
        the attention layers apply the causal rule themselves)."""
        if padding is None:
            return None
        mask = padding.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        if self.causal:
            mask = mask & causal_mask(q_len, k_len, device)  # (B, 1, T, S)
        # A query whose keys are all padding (left-padded rows) would softmax over nothing and give NaN;
        # letting it see itself keeps the row finite, and padded rows are ignored by the loss anyway.
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        return mask | (torch.arange(k_len, device=device)[None, :] == q_pos[:, None])  # (B, 1, T, S)

    #: The document-mask backend (`llm.models.masks`): None picks flex on CUDA, sdpa elsewhere.
    document_mask_backend: str | None = None

    def _document_mask(self, document_ids: Tensor, padding: Tensor | None) -> Any:
        """The block-diagonal (and causal) mask of packed documents, built once per forward for every layer."""
        if padding is not None:
            padding = padding.to(document_ids.device)
        dropout = self.training and self.config.dropout > 0  # FlexAttention has no attention dropout
        return masks.build_document_mask(document_ids, padding, causal=self.causal,
                                         sliding_window=self.config.sliding_window,
                                         backend=self.document_mask_backend, dropout=dropout,
                                         head_dim=self.config.head_dim)

    # ------------------------------------------------------------------------ what a training engine reads
    def fsdp_units(self) -> list[nn.Module]:
        """Submodules to shard one by one (each all-gathered only while it runs): the blocks (root: the rest)."""
        return list(self.layers)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """All parameters (tied ones once); ``exclude_embeddings`` leaves out the input embedding table."""
        n = flops.num_parameters(self)
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n

    def active_parameters(self) -> float:
        """Parameters a token is multiplied by (see :func:`llm.models.flops.active_parameters`)."""
        return flops.active_parameters(self)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len`` (see :func:`llm.models.flops.flops_per_token`)."""
        return flops.flops_per_token(self, seq_len)


def _keyword_signature(extra: list[inspect.Parameter]) -> inspect.Signature:
    """``(config=None, /, *, <ModelConfig fields>, <extra>)``: what ``inspect.signature`` and ``help()`` show for a
    class whose ``__init__`` takes ``**fields``, so tools that filter a mapping by the accepted keywords still can."""
    P = inspect.Parameter
    params = [P("config", P.POSITIONAL_ONLY, default=None, annotation="ModelConfig | None")]
    params += [P(f.name, P.KEYWORD_ONLY, annotation=f.type,
                 default=f.default_factory() if f.default is dataclasses.MISSING else f.default)  # type: ignore[misc]
               for f in dataclasses.fields(ModelConfig)]
    return inspect.Signature([*params, *extra], return_annotation=None)


_CAUSAL = inspect.Parameter("causal", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=bool)
DecoderModel.__signature__ = _keyword_signature([_CAUSAL])  # type: ignore[attr-defined]
TransformerBlock.__signature__ = _keyword_signature([_CAUSAL])  # type: ignore[attr-defined]
