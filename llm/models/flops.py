"""Parameter counts and training FLOPs per token: the one definition, next to the models it describes.

Model FLOPs per token follow PaLM (appendix B) and torchtitan, so numbers compare with theirs:
``6 * N_active + 12 * n_layers * d_attn * seq_len``. ``N_active`` counts every weight a token is multiplied
by (forward 2 + backward 4 FLOPs each): all parameters except pure lookup embeddings (a tied output layer
counts once), with the routed experts of an MoE layer scaled by ``top_k / num_experts``. The attention term
covers scores and values (``d_attn`` = query heads x head dim), forward and backward, without halving for
the causal mask. Recomputation by activation checkpointing is not counted: this is MFU, not hardware FLOPs.

The functions take any module and find the layers they count (`Attention`, `MoELayer`) inside it, so a
task's own model built from these layers is counted without declaring anything; `DecoderModel` exposes them
as methods too.

Under expert parallelism a rank holds only its `num_experts / ep` experts (the expert tensors' first dimension);
the counts scale those tensors back to the whole layer, so every rank reports the whole model, as one process does.
"""

from __future__ import annotations

from torch import nn

from llm.models.layers import Attention
from llm.models.moe import MoELayer


def _expert_tensors(model: nn.Module) -> dict[int, tuple[int, int, int]]:
    """id -> (experts held here, experts of the layer, top_k) for the routed-expert tensors of every `MoELayer`."""
    held: dict[int, tuple[int, int, int]] = {}
    for m in model.modules():
        if isinstance(m, MoELayer):
            for p in (m.w_gate_up, m.w_down):
                held[id(p)] = (max(1, p.shape[0]), m.num_experts, m.top_k)
    return held


def num_parameters(model: nn.Module) -> int:
    """All parameters of the whole model; a tensor shared by several modules (tied embeddings) counts once, and
    the experts held by other expert-parallel ranks count as well."""
    experts = _expert_tensors(model)
    total = 0
    for p in model.parameters():
        local, whole, _ = experts.get(id(p), (1, 1, 0))
        total += p.numel() // local * whole
    return total


def active_parameters(model: nn.Module) -> float:
    """Parameters a token is multiplied by: lookup-only embeddings excluded, routed experts times top_k / E."""
    lookup_only = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    lookup_only -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}  # tied output layer
    # A routed-expert tensor holding `local` of the layer's experts: a token multiplies top_k experts' worth of it.
    scale = {key: top_k / local for key, (local, _, top_k) in _expert_tensors(model).items()}
    # parameters() yields a shared (tied) tensor once.
    return sum(p.numel() * scale.get(id(p), 1.0) for p in model.parameters() if id(p) not in lookup_only)


def attention_width(model: nn.Module) -> int:
    """Sum over attention layers of query heads x head dim (the `n_layers * d_attn` of the attention term)."""
    return sum(_heads(m) * m.head_dim for m in model.modules() if isinstance(m, Attention))


def _heads(attention: nn.Module) -> int:
    """The layer's query heads; under tensor parallelism an `Attention` holds its rank's share (`tensor_parallel`
    is set by llm.training.parallel.tensor), and the FLOPs are the whole model's."""
    return attention.num_heads * getattr(attention, "tensor_parallel", 1)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N_active + 12 * n_layers * d_attn * seq_len, where a
    sliding-window layer (Mistral) attends ``min(seq_len, window)`` keys instead of ``seq_len``."""
    windowed = sum(_heads(m) * m.head_dim * (min(seq_len, m.sliding_window) - seq_len) for m in model.modules()
                   if isinstance(m, Attention) and getattr(m, "sliding_window", None) is not None)
    return 6 * active_parameters(model) + 12 * (attention_width(model) * seq_len + windowed)
