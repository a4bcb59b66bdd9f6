"""`ModelConfig`: the one list of the decoder's fields, shared by the model, its layers and the run's config.

The training config's ``model:`` section is this dataclass, and ``DecoderModel``, ``TransformerBlock``,
``Attention`` and ``MoELayer.from_config`` read it, so a field is added in exactly one place. The trailing
comment of each field is its ``--help`` text (the CLI reads it from this source), so keep one field per line.

Three fields default to None and are derived where they are read: ``num_kv_heads`` (= ``num_heads``),
``intermediate_size`` (Llama's SwiGLU width from ``hidden_size``, rounded up to ``intermediate_multiple_of``, see
`default_intermediate_size`) and ``moe_intermediate_size`` (= ``intermediate_size``). `ModelConfig.resolved()` fills
them in; a built model keeps the resolved copy as ``model.config``. A task tunes the rule (the ``lm`` task rounds to
8), never the derived width itself, so a user who widens the model gets a matching MLP.

Presets (:mod:`llm.models.presets`) are applied where a config is made: `ModelConfig.from_preset`, keywords
``DecoderModel(preset=NAME, **overrides)`` (the preset's fields are the defaults of the keywords not given) and the
CLI (``--model-preset``). A finished config's ``preset`` is only the record of where its values came from:
``DecoderModel(config)`` takes ``config``'s values as they are.

`Freezable` (from :mod:`llm.config`): the run's resolved config freezes its model section with the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, List

from llm.config.freeze import Freezable
from llm.errors import invalid
from llm.models.presets import get_preset

# How the MoE layers count the expert load their balance loss is taken over (`llm.models.moe.layer`).
BALANCES: tuple[str, ...] = ("global", "micro", "aux_free")
# How the rotary embedding's frequencies are scaled (`llm.models.layers.scaled_inv_freq`).
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


def default_intermediate_size(hidden_size: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*hidden (same parameter count as a 4x GELU MLP), rounded up to a multiple of
    ``multiple_of`` (Llama: 256; 8 keeps the unrounded width, e.g. 344 at hidden 128)."""
    if multiple_of < 1:
        raise ValueError(f"intermediate_multiple_of must be >= 1, got {multiple_of}")
    return multiple_of * math.ceil(int(8 * hidden_size / 3) / multiple_of)


@dataclass
class ModelConfig(Freezable):
    """Model sizes; the field names are `DecoderModel`'s keyword arguments."""

    preset: str = ""  # named model shape (smollm2-135m, tinyllama-1.1b, tiny, ...); other model fields override it
    init_from: str = ""  # start from these weights: an HF Llama/Mixtral folder, a run or a checkpoint directory
    vocab_size: int = 256  # token vocabulary (the lm task sets it from the tokenizer unless given)
    hidden_size: int = 128  # width of the residual stream
    num_layers: int = 4  # number of TransformerBlocks
    num_heads: int = 4  # attention heads; must divide hidden_size
    num_kv_heads: int | None = None  # key/value heads for grouped-query attention (default: num_heads)
    intermediate_size: int | None = None  # MLP width (default: 8/3 hidden_size, rounded up to intermediate_multiple_of)
    intermediate_multiple_of: int = 256  # rounding of the derived intermediate_size (Llama: 256)
    max_seq_len: int = 2048  # context length the model is made for (lm: raised to data.seq_len unless set)
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
    moe_balance: str = "global"  # global (over the global batch) | micro (each micro-batch) | aux_free (routing bias)
    moe_bias_update_rate: float = 0.001  # aux_free: how far the routing bias moves per optimizer step
    # Hugging Face family variants (llm.models.hf); the defaults are plain Llama, so older configs build the same model
    hf_architecture: str = ""  # HF class to export as (Qwen2ForCausalLM, Qwen3ForCausalLM; "": Llama or Mixtral)
    rope_type: str = "default"  # rotary frequency scaling: default | linear | llama3 (Llama 3.1+)
    rope_factor: float = 1.0  # linear/llama3: how many times longer the context is than the unscaled one
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original/low_freq_factor are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original/high_freq_factor are kept as they are
    rope_original_max_seq_len: int = 8192  # llama3: the context length the unscaled frequencies were trained for
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2/2.5)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys, before rotary (Qwen3)
    head_size: int | None = None  # width of one attention head (default: hidden_size / num_heads; Qwen3 sets it)
    # Mistral and Qwen3-MoE (issue 20): None / the defaults are the plain Llama/Mixtral model, bitwise.
    sliding_window: int | None = None  # attend only the last N positions, its own included (default: all; Mistral)
    moe_norm_topk_prob: bool = True  # renormalise the top-k gates to sum to 1 (Qwen3-MoE's norm_topk_prob)
    moe_dense_layers: List[int] = field(default_factory=list)  # blocks with a dense MLP under use_moe (default: none)
    # Recipe levers (issue 24); off by default, so older configs build the same model, bitwise.
    zero_init_output: bool = False  # o_proj/down_proj start at zero (blocks start as the identity)
    logit_softcap: float = 0.0  # cap * tanh(logits / cap) on the logits (0 = off; not exportable)
    # On a CPU, bf16/fp16 queries, keys and values go through the attention kernel in fp32 and its output back (the
    # kernel is faster so for short heads on the CPUs measured; numerics only: the weights and the export are the same)
    attention_fp32_on_cpu: bool = False

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``head_size`` where set, else ``hidden_size / num_heads``."""
        return self.head_size or self.hidden_size // self.num_heads

    def check_rope(self, section: str = "model") -> None:
        """Refuse rotary-scaling values the embedding cannot take: a ConfigError naming ``section.field``."""
        if self.rope_type not in ROPE_TYPES:
            raise invalid(f"{section}.rope_type", self.rope_type, f"one of {', '.join(ROPE_TYPES)}", ROPE_TYPES)
        if not self.rope_factor > 0:
            raise invalid(f"{section}.rope_factor", self.rope_factor, "must be > 0")
        if self.rope_type == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise invalid(f"{section}.rope_high_freq_factor", self.rope_high_freq_factor,
                          f"must be > rope_low_freq_factor ({self.rope_low_freq_factor}) > 0")

    def is_moe_layer(self, index: int) -> bool:
        """Whether block ``index`` (0-based) has the MoE MLP: ``use_moe`` and not in ``moe_dense_layers`` (Qwen3-MoE's
        ``mlp_only_layers`` and ``decoder_sparse_step`` in one list; empty: every block, as Mixtral)."""
        return self.use_moe and index not in self.moe_dense_layers

    def check_moe(self, section: str = "model") -> None:
        """Refuse MoE field values the layers cannot take (and a sliding window under 1, a negative logit soft cap):
        a ConfigError naming ``section.field``."""
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate"):
            if not getattr(self, name) >= 0:
                raise invalid(f"{section}.{name}", getattr(self, name), "must be >= 0")
        if self.moe_balance not in BALANCES:
            raise invalid(f"{section}.moe_balance", self.moe_balance, f"one of {', '.join(BALANCES)}", BALANCES)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise invalid(f"{section}.sliding_window", self.sliding_window, "must be >= 1 (or unset: no window)")
        if any(not 0 <= i < self.num_layers for i in self.moe_dense_layers):
            raise invalid(f"{section}.moe_dense_layers", self.moe_dense_layers,
                          f"block indices in [0, num_layers={self.num_layers})")
        if not self.logit_softcap >= 0:  # the recipe levers' one range (issue 24)
            raise invalid(f"{section}.logit_softcap", self.logit_softcap, "must be >= 0 (0 = off)")

    def export_blockers(self) -> list[str]:
        """The fields whose values a stock Llama/Qwen/Mistral/Mixtral class of transformers cannot represent (an
        export would load and run a different model): ``logit_softcap`` (Gemma2 has one, in another architecture)."""
        return [f"logit_softcap={self.logit_softcap:g}"] if self.logit_softcap else []

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The preset's fields over the defaults, then ``overrides``; unresolved (derived fields stay None).

        An unknown preset is a ConfigError with the closest name; an unknown field a TypeError, as in DecoderModel.
        """
        _check_names(overrides, "ModelConfig.from_preset")
        return dataclasses.replace(cls(), **{**get_preset(name).fields, "preset": name, **overrides})

    def resolved(self) -> ModelConfig:
        """A copy with the derived fields (None = default) filled in; the values a built model uses."""
        intermediate = self.intermediate_size or default_intermediate_size(self.hidden_size,
                                                                           self.intermediate_multiple_of)
        return dataclasses.replace(
            self,
            num_kv_heads=self.num_kv_heads or self.num_heads,
            intermediate_size=intermediate,
            moe_intermediate_size=self.moe_intermediate_size or intermediate,
        )


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ModelConfig))


def _check_names(fields: dict[str, Any], owner: str) -> None:
    """An unknown field name raises TypeError, as a mistyped keyword argument would."""
    unknown = sorted(set(fields) - set(FIELD_NAMES))
    if unknown:
        close = difflib.get_close_matches(unknown[0], FIELD_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{owner} got unexpected keyword arguments {unknown}{hint}")


def build_config(config: ModelConfig | None, fields: dict[str, Any], owner: str) -> ModelConfig:
    """The resolved config of ``owner(config, **fields)``: ``config`` (default ``ModelConfig()``) with ``fields``
    replacing its values. A ``preset`` keyword stands for its fields, under the other keywords, so
    ``owner(**asdict(config))`` builds what ``owner(config)`` builds; ``config.preset`` alone is a record."""
    _check_names(fields, owner)
    if config is not None and not isinstance(config, ModelConfig):
        raise TypeError(f"{owner} takes a ModelConfig or keyword arguments, got {type(config).__name__}")
    base = config or ModelConfig()
    if fields.get("preset"):
        base = dataclasses.replace(base, **get_preset(fields["preset"]).fields)
    return dataclasses.replace(base, **fields).resolved()
