"""The decoder's building blocks: RMSNorm, rotary embeddings, grouped-query attention, the SwiGLU MLP.

A leaf module (it imports only the config and, for type hints, the KV cache), so the MoE layer and other models
can use these layers without importing the decoder. The file reads top-down: norm -> rotary -> attention -> MLP.
Parameter names follow the Hugging Face Llama layout (``q_proj``, ``gate_proj``, ...), see :mod:`llm.models.hf`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.models.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from llm.models.generation import LayerKVCache


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

    ``forward(positions)`` returns ``(cos, sin)`` of shape ``(T, head_dim)`` in fp32 for positions (T,), or
    ``(B, T, head_dim)`` for per-row positions (B, T) (packed documents, :mod:`llm.models.masks`). They are computed
    on the fly from ``inv_freq`` (a few thousand multiplies per forward, shared by all layers), which needs no host
    sync and works for positions beyond ``max_seq_len`` (kept as the model's nominal context length).
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, max_seq_len: int = 2048, theta: float = 10000.0,
                 scaling: ModelConfig | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.scaling = scaling  # its rope_* fields scale the frequencies (None or rope_type default: unscaled)
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)  # (head_dim / 2,)
        return inv_freq if self.scaling is None else scaled_inv_freq(inv_freq, self.scaling)

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        # model.to(bfloat16) would round inv_freq; rebuild it in fp32 on the new device instead.
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # (T, head_dim / 2) or (B, T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim) or (B, T, head_dim)
        return emb.cos(), emb.sin()


def scaled_inv_freq(inv_freq: Tensor, c: ModelConfig) -> Tensor:
    """``inv_freq`` scaled as ``c.rope_type`` says (the values HF's rope initialisers give, in fp32).

    ``linear`` divides every frequency by ``rope_factor``. ``llama3`` (Llama 3.1+) divides only the low
    frequencies, those whose wavelength exceeds ``original / low_freq_factor``; it keeps those shorter than
    ``original / high_freq_factor`` and blends linearly in between, so local order is resolved as in training
    while long-range positions are stretched ``rope_factor`` times.
    """
    if c.rope_type == "default":
        return inv_freq
    if c.rope_type == "linear":
        return inv_freq / c.rope_factor
    if c.rope_type != "llama3":
        raise ValueError(f"unknown rope_type {c.rope_type!r}: expected default, linear or llama3")
    original, low, high = c.rope_original_max_seq_len, c.rope_low_freq_factor, c.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    long_waves = wavelength > original / low
    scaled = torch.where(long_waves, inv_freq / c.rope_factor, inv_freq)
    blend = (original / wavelength - low) / (high - low)  # 0 at the long edge, 1 at the short edge
    blended = (1 - blend) * scaled / c.rope_factor + blend * scaled
    medium = ~(wavelength < original / high) & ~long_waves
    return torch.where(medium, blended, scaled)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, n_heads, T, head_dim) by the angles in ``cos``/``sin``: (T, head_dim) shared by the rows, or
    (B, 1, T, head_dim) per row (broadcast over the heads)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------- attention
def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """Bool mask (q_len, k_len), True = attend. Bottom-right aligned: query i sits at position k_len - q_len + i,
    so a query block appended after a KV cache sees every cached key plus a causal block of its own."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def sliding_window_mask(q_len: int, k_len: int, window: int, device: torch.device | None = None) -> Tensor:
    """Bool mask (q_len, k_len), True = attend: the causal rule of `causal_mask` (bottom-right aligned) limited to
    the last ``window`` keys, the query's own included (Mistral's band: ``q - window < k <= q``)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    offset = q_pos[:, None] - k_pos[None, :]  # (q_len, k_len)
    return (offset >= 0) & (offset < window)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (``num_kv_heads`` divides ``num_heads``) through SDPA.

    Reads ``hidden_size``, ``num_heads``, ``num_kv_heads`` (None = ``num_heads``) and ``dropout`` from ``config``;
    ``causal=False`` attends in both directions (encoders). With ``sliding_window`` each query attends only the last
    ``sliding_window`` keys (Mistral), through a banded bool mask, on every device: SDPA then runs its
    memory-efficient kernel (flash takes no mask). Only a sequence longer than the window gets the mask, so
    shorter ones run exactly as without the field.
    """

    def __init__(self, config: ModelConfig, causal: bool = True) -> None:
        super().__init__()
        hidden_size, num_heads = config.hidden_size, config.num_heads
        num_kv_heads = config.num_kv_heads or num_heads
        if hidden_size % num_heads and not config.head_size:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.causal = causal
        self.sliding_window = config.sliding_window
        if self.sliding_window is not None and (self.sliding_window < 1 or not causal):
            raise ValueError(f"sliding_window must be >= 1 on a causal model, got {self.sliding_window} "
                             f"(causal={causal})")
        bias = config.qkv_bias
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        # Qwen3's QK-norm: one RMSNorm over each head's width, shared by the heads, before the rotation
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.fp32_on_cpu = config.attention_fp32_on_cpu

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None = None,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        """``attn_mask``: bool, True = attend, broadcastable to (B, n_heads, T, S); it replaces the causal rule. Or a
        document mask that runs its own kernel (an object with ``attend``, see :mod:`llm.models.masks`), which holds
        the causal rule, the sliding window and the padding already."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over head_dim, the last axis
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if attn_mask is not None and not isinstance(attn_mask, Tensor):  # a document mask with its own kernel
            y = attn_mask.attend(q, k, v, enable_gqa=self.num_kv_heads != self.num_heads)  # (B, n_heads, T, hd)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, hidden)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv, S, head_dim), S = cached + T
        S = k.shape[2]
        if self.sliding_window is not None and S > self.sliding_window:
            band = sliding_window_mask(T, S, self.sliding_window, x.device)  # (T, S)
            attn_mask = band if attn_mask is None else attn_mask & band  # (B, 1, T, S) with padding
        if attn_mask is None and self.causal and T > 1 and S != T:
            attn_mask = causal_mask(T, S, x.device)
        is_causal = attn_mask is None and self.causal and T > 1
        kwargs = {"attn_mask": attn_mask, "is_causal": is_causal, "dropout_p": self.dropout if self.training else 0.0,
                  "enable_gqa": self.num_kv_heads != self.num_heads}
        if self.fp32_on_cpu and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            y = attention_in_fp32(q, k, v, **kwargs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, **kwargs)  # (B, n_heads, T, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, hidden)


def attention_in_fp32(q: Tensor, k: Tensor, v: Tensor, **kwargs: Any) -> Tensor:
    """``F.scaled_dot_product_attention`` on fp32 copies of low-precision ``q``, ``k``, ``v``, its output cast back
    (``model.attention_fp32_on_cpu``). torch's CPU flash-attention kernel runs faster in fp32 than in bf16 for
    narrow heads: forward + backward of (16, 4, 256, 32) heads 0.74-0.76x on the development machine (AVX512-BF16/AMX),
    a whole training step of that model 0.93x; about even at 64 wide, and with 128-wide heads over 1,024 positions
    bf16 is faster (1.28x), so it is an option, not a rule (`python -m benchmarks.bench_attention`)."""
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast the copies straight back to bf16
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)


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
