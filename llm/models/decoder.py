"""Decoder-only transformer: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP (or MoE).

The file reads top-down: norm -> rotary -> attention -> MLP -> block -> model. Module and parameter names
follow the Hugging Face Llama layout (``embed_tokens``, ``layers.{i}.self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``, ``norm``, ``lm_head``) so that weight conversion in :mod:`llm.models.hf` is a key map.
With ``use_moe`` every block's ``mlp`` is a :class:`~llm.models.moe.MoELayer`.

The model returns plain logits; the loss belongs to the task. MoE auxiliary losses of the last forward are
available as ``model.aux_loss`` (or :func:`~llm.models.moe.collect_aux_loss` on any module).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llm.models.generation import GenerationMixin, KVCache, LayerKVCache
from llm.models.moe import MoELayer, collect_aux_loss

INIT_STD = 0.02


def default_intermediate_size(hidden_size: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*hidden (same parameter count as a 4x GELU MLP), rounded up to 256."""
    return multiple_of * math.ceil(int(8 * hidden_size / 3) / multiple_of)


# ----------------------------------------------------------------------------------------------------------- norm
class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as HF Llama), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel, same values
        # fp32 statistics keep bf16 activations stable; the cast back happens before the weight multiply,
        # exactly as HF does, so converted checkpoints give the same values in the weight's dtype.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# -------------------------------------------------------------------------------------------------------- rotary
class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (HF Llama "rotate half" convention).

    ``forward(positions)`` returns ``(cos, sin)`` of shape ``(T, head_dim)`` in fp32. They are computed on the fly
    from ``inv_freq`` (a few thousand multiplies per forward, shared by all layers), which needs no host sync
    and works for positions beyond ``max_seq_len`` (kept as the model's nominal context length).
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, max_seq_len: int = 2048, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponent)  # (head_dim / 2,)

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        # model.to(bfloat16) would round inv_freq; rebuild it in fp32 on the new device instead.
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
        return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, n_heads, T, head_dim) by the angles in ``cos``/``sin`` (T, head_dim)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------- attention
def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """Bool mask (q_len, k_len), True = attend. Bottom-right aligned: query i sits at position k_len - q_len + i,
    so a query block appended after a KV cache sees every cached key plus a causal block of its own."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    return k_pos[None, :] <= q_pos[:, None]


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (``num_kv_heads`` divides ``num_heads``) through SDPA."""

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, dropout: float = 0.0,
        causal: bool = True,
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.causal = causal
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        """``attn_mask``: bool, True = attend, broadcastable to (B, n_heads, T, S); it replaces the causal rule."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv, S, head_dim), S = cached + T
        S = k.shape[2]
        if attn_mask is None and self.causal and T > 1 and S != T:
            attn_mask = causal_mask(T, S, x.device)
        is_causal = attn_mask is None and self.causal and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, n_heads, T, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, hidden)


# ----------------------------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (..., hidden)


# --------------------------------------------------------------------------------------------------------- block
# Model-level ModelConfig fields a block does not need; accepted so `TransformerBlock(**asdict(cfg))` works.
_MODEL_LEVEL_FIELDS = frozenset({"vocab_size", "max_seq_len", "rope_theta", "tie_embeddings"})


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); the MLP is an MoE layer when ``use_moe``.

    ``num_layers`` only sets the init scale of the residual output projections (1/sqrt(2*num_layers)).
    Setting ``activation_checkpointing = True`` recomputes the block's activations in backward instead of
    storing them (non-reentrant ``torch.utils.checkpoint``; only when grad is on and no KV cache is used).
    """

    activation_checkpointing: bool = False

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        use_moe: bool = False,
        num_experts: int = 8,
        top_k: int = 2,
        moe_intermediate_size: int | None = None,
        num_shared_experts: int = 0,
        moe_aux_loss_coef: float = 0.01,
        moe_z_loss_coef: float = 0.001,
        causal: bool = True,
        num_layers: int = 1,
        **model_level: Any,
    ) -> None:
        super().__init__()
        unknown = set(model_level) - _MODEL_LEVEL_FIELDS
        if unknown:
            raise TypeError(f"TransformerBlock got unexpected keyword arguments {sorted(unknown)}")
        intermediate_size = intermediate_size or default_intermediate_size(hidden_size)
        self.input_layernorm = RMSNorm(hidden_size, norm_eps)
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, dropout, causal)
        self.post_attention_layernorm = RMSNorm(hidden_size, norm_eps)
        self.mlp: nn.Module
        if use_moe:
            self.mlp = MoELayer(
                hidden_size, num_experts, top_k, moe_intermediate_size or intermediate_size,
                num_shared_experts=num_shared_experts, aux_loss_coef=moe_aux_loss_coef, z_loss_coef=moe_z_loss_coef,
            )
        else:
            self.mlp = MLP(hidden_size, intermediate_size)
        self.resid_dropout = nn.Dropout(dropout)
        self.init_weights(num_layers)

    def init_weights(self, num_layers: int = 1, std: float = INIT_STD) -> None:
        """Normal(0, std) everywhere; projections writing into the residual stream get std/sqrt(2*num_layers)
        so the residual variance does not grow with depth (GPT-2 / nanoGPT)."""
        resid_std = std / math.sqrt(2 * num_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                nn.init.normal_(p, std=resid_std)
            else:
                nn.init.normal_(p, std=std)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, attn_mask, None, use_reentrant=False)
        return self._forward(x, cos, sin, attn_mask, cache)

    def _forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, cache: LayerKVCache | None
    ) -> Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache))  # (B, T, H)
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))  # (B, T, H)


# --------------------------------------------------------------------------------------------------------- model
class DecoderModel(GenerationMixin, nn.Module):
    """Token embedding -> ``num_layers`` TransformerBlocks -> final RMSNorm -> LM head (optionally tied).

    Constructor keywords equal the ``ModelConfig`` field names, so ``DecoderModel(**asdict(config.model))``
    works. Defaults: ``num_kv_heads = num_heads``; ``intermediate_size`` = Llama's 8/3*hidden rounded up to a
    multiple of 256; ``moe_intermediate_size = intermediate_size``. ``causal=False`` gives bidirectional
    attention for non-LM tasks.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        max_seq_len: int = 2048,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        tie_embeddings: bool = False,
        dropout: float = 0.0,
        use_moe: bool = False,
        num_experts: int = 8,
        top_k: int = 2,
        moe_intermediate_size: int | None = None,
        num_shared_experts: int = 0,
        moe_aux_loss_coef: float = 0.01,
        moe_z_loss_coef: float = 0.001,
        causal: bool = True,
    ) -> None:
        super().__init__()
        intermediate_size = intermediate_size or default_intermediate_size(hidden_size)
        self.config: dict[str, Any] = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=num_kv_heads or num_heads, intermediate_size=intermediate_size, max_seq_len=max_seq_len,
            rope_theta=rope_theta, norm_eps=norm_eps, tie_embeddings=tie_embeddings, dropout=dropout,
            use_moe=use_moe, num_experts=num_experts, top_k=top_k,
            moe_intermediate_size=moe_intermediate_size or intermediate_size,
            num_shared_experts=num_shared_experts, moe_aux_loss_coef=moe_aux_loss_coef,
            moe_z_loss_coef=moe_z_loss_coef, causal=causal,
        )
        self.causal = causal
        self.max_seq_len = max_seq_len
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.embed_dropout = nn.Dropout(dropout)
        block_kwargs = {k: v for k, v in self.config.items() if k not in _MODEL_LEVEL_FIELDS}
        self.layers = nn.ModuleList(TransformerBlock(**block_kwargs) for _ in range(num_layers))
        self.norm = RMSNorm(hidden_size, norm_eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.rotary = RotaryEmbedding(hidden_size // num_heads, max_seq_len, rope_theta)
        nn.init.normal_(self.embed_tokens.weight, std=INIT_STD)
        nn.init.normal_(self.lm_head.weight, std=INIT_STD)
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def tiny(cls, **overrides: Any) -> DecoderModel:
        """The preset tests use: a few thousand parameters, GQA (4 heads, 2 KV heads), 2 layers."""
        kwargs: dict[str, Any] = dict(
            vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
            max_seq_len=128, num_experts=4, top_k=2, moe_intermediate_size=32,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], **kwargs: Any) -> DecoderModel:
        """Build on the meta device (no random init) and adopt ``state``'s tensors, device and dtype as they are.

        A tied model needs only one of ``embed_tokens.weight`` / ``lm_head.weight`` (a safetensors file keeps one).
        """
        state = dict(state)
        if kwargs.get("tie_embeddings"):
            tied = state.get("embed_tokens.weight", state.get("lm_head.weight"))
            if tied is not None:
                state.setdefault("embed_tokens.weight", tied)
                state.setdefault("lm_head.weight", tied)
        with torch.device("meta"):
            model = cls(**kwargs)
        model.load_state_dict(state, strict=True, assign=True)
        if model.config["tie_embeddings"]:
            model.lm_head.weight = model.embed_tokens.weight
        # Tensors that are not in the state_dict were created on meta; rebuild them where the weights live.
        device = model.embed_tokens.weight.device
        model.rotary.inv_freq = model.rotary._inv_freq(device)
        for m in model.modules():
            if isinstance(m, MoELayer):
                m.tokens_per_expert = torch.zeros(m.num_experts, dtype=torch.long, device=device)
        return model

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the last forward's MoE auxiliary losses (already times their coefficients); None if dense."""
        return collect_aux_loss(self)

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab) of ``input_ids`` (B, T) or ``inputs_embeds`` (B, T, hidden).

        ``attention_mask`` (B, S) marks real (1/True) vs padding (0) keys, S = cached + T. ``positions`` (T,)
        defaults to cached + arange(T). ``cache`` enables incremental decoding (see :meth:`generate`).
        ``return_hidden`` returns the final-norm hidden states (B, T, hidden) instead of logits, for fused or
        chunked output-layer losses.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        T = x.shape[1]
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device)
        cos, sin = self.rotary(positions)  # (T, head_dim) each
        attn_mask = self._attention_mask(attention_mask, T, start + T, x.device)
        x = self.embed_dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, cache.layers[i] if cache is not None else None)  # (B, T, H)
        x = self.norm(x)  # (B, T, H)
        return x if return_hidden else self.lm_head(x)  # (B, T, vocab)

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

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embeddings else n
