"""`ModelConfig`: the one list of the decoder's fields, shared by the model, its layers and the run's config.

The training config's ``model:`` section is this dataclass, and ``DecoderModel``, ``TransformerBlock``,
``Attention`` and ``MoELayer.from_config`` read it, so a field is added in exactly one place. The trailing
comment of each field is its ``--help`` text (the CLI reads it from this source), so keep one field per line.

Three fields default to None and are derived where they are read: ``num_kv_heads`` (= ``num_heads``),
``intermediate_size`` (Llama's SwiGLU width, see `default_intermediate_size`) and ``moe_intermediate_size``
(= ``intermediate_size``). `ModelConfig.resolved()` fills them in; a built model keeps the resolved copy as
``model.config``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any


def default_intermediate_size(hidden_size: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*hidden (same parameter count as a 4x GELU MLP), rounded up to 256."""
    return multiple_of * math.ceil(int(8 * hidden_size / 3) / multiple_of)


@dataclass
class ModelConfig:
    """Model sizes; the field names are `DecoderModel`'s keyword arguments."""

    vocab_size: int = 256  # token vocabulary (the lm task sets it from the tokenizer unless given)
    hidden_size: int = 128  # width of the residual stream
    num_layers: int = 4  # number of TransformerBlocks
    num_heads: int = 4  # attention heads; must divide hidden_size
    num_kv_heads: int | None = None  # key/value heads for grouped-query attention (default: num_heads)
    intermediate_size: int | None = None  # MLP width (default: SwiGLU-sized from hidden_size)
    max_seq_len: int = 2048  # longest sequence the rotary cache covers
    rope_theta: float = 10000.0  # rotary embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share input embedding and output layer weights
    dropout: float = 0.0  # dropout on attention and residual branches
    use_moe: bool = False  # replace each block's MLP with a Mixture-of-Experts layer
    num_experts: int = 8  # experts per MoE layer
    top_k: int = 2  # experts activated per token
    moe_intermediate_size: int | None = None  # width of each expert (default: intermediate_size)
    num_shared_experts: int = 0  # always-on experts added to the routed ones
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing auxiliary loss
    moe_z_loss_coef: float = 0.001  # weight of the router z-loss

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def resolved(self) -> ModelConfig:
        """A copy with the derived fields (None = default) filled in; the values a built model uses."""
        intermediate = self.intermediate_size or default_intermediate_size(self.hidden_size)
        return dataclasses.replace(
            self,
            num_kv_heads=self.num_kv_heads or self.num_heads,
            intermediate_size=intermediate,
            moe_intermediate_size=self.moe_intermediate_size or intermediate,
        )


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ModelConfig))


def build_config(config: ModelConfig | None, fields: dict[str, Any], owner: str) -> ModelConfig:
    """The resolved config of ``owner(config, **fields)``: ``config`` (default ``ModelConfig()``) with ``fields``
    replacing its values. An unknown field name raises TypeError, as a mistyped keyword argument would."""
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELD_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{owner} got unexpected keyword arguments {unknown}{hint}")
    if config is not None and not isinstance(config, ModelConfig):
        raise TypeError(f"{owner} takes a ModelConfig or keyword arguments, got {type(config).__name__}")
    return dataclasses.replace(config or ModelConfig(), **fields).resolved()
