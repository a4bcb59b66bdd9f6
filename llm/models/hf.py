"""Hugging Face interchange: load/save ``LlamaForCausalLM``, ``MistralForCausalLM``, ``MixtralForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` and ``Qwen3MoeForCausalLM`` directories.

The families are DecoderModel configuration, not copies of the model: Llama 3's ``rope_type: llama3`` (and
``linear``) scaling sets the ``rope_*`` fields, Qwen2's q/k/v biases ``qkv_bias``, Qwen3's QK-norm ``qk_norm`` and
its own ``head_dim`` ``head_size``; Mistral is Llama plus ``sliding_window``; Qwen3-MoE is Qwen3's attention with
Mixtral's MoE, experts of their own width (``moe_intermediate_size``), gates not renormalised unless
``norm_topk_prob``, dense blocks where ``mlp_only_layers`` / ``decoder_sparse_step`` say (one list,
``moe_dense_layers``) and per-expert names ``mlp.experts.{e}.{gate,up,down}_proj`` beside the router ``mlp.gate``.
``hf_architecture`` records the class, so the export writes the same class and ``model_type``. A config.json field
that would change the function and is not implemented is refused by name.

Reads and writes the ``save_pretrained`` layout (``config.json`` + ``model.safetensors`` or sharded
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``) using only ``safetensors`` and
``json``: transformers is never imported. Since DecoderModel uses HF Llama's module names, dense weights are a
prefix strip; MoE experts are stacked here and per-expert in HF's files.

Mixtral experts on disk, as transformers 5.24 writes them (and 4.x did): per expert
``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` (gate, (I, H)), ``w3`` (up, (I, H)), ``w2`` (down,
(H, I)) and the router ``block_sparse_moe.gate.weight``. transformers 5 holds them fused in memory
(``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I), ``mlp.gate.weight``); files with
those names (e.g. a raw ``state_dict`` dump) are accepted too. ``save_hf`` writes the per-expert form.

A folder is untrusted input, read in bounded time and memory and checked before any tensor data is read
(`read_hf_folder`): ``config.json`` and the index are plain JSON (`llm.untrusted`), every field has its type and
range (an `HFFormatError` names the field and value: ``num_attention_heads`` 4.5, ``rope_theta`` beyond float32),
fields that say one thing twice agree, every weight file is a regular file, the index and the files' headers agree
on which file holds which tensor (none twice), and ``config.json`` agrees with the headers: the layer count (from
the names, before anything is built), each tensor's shape, and the tie flag (``lm_head.weight`` absent under
``tie_word_embeddings: false``, or different from the embedding under ``true``, is refused). ``torch_dtype`` is
not checked: the tensors' own dtypes are what a loaded model has.

HF's router aux-loss coefficient is not carried over: its loss is normalized differently (times top_k, averaged
over layers), so the loaded model keeps DecoderModel's own ``moe_aux_loss_coef``/``moe_z_loss_coef`` defaults.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from llm import untrusted
from llm.errors import UserError, show
from llm.models.decoder import DecoderModel

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_EXPERT = re.compile(r"^model\.layers\.(\d{1,9})\.block_sparse_moe\.experts\.(\d{1,9})\.(w[123])\.weight$")
# Qwen3-MoE's per-expert names, and which of Mixtral's w1 (gate) / w2 (down) / w3 (up) each one is.
_QWEN_EXPERT = re.compile(r"^model\.layers\.(\d{1,9})\.mlp\.experts\.(\d{1,9})\.(gate_proj|up_proj|down_proj)\.weight$")
_QWEN_AS_MIXTRAL = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_FUSED = re.compile(r"^model\.layers\.(\d{1,9})\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^model\.layers\.(\d{1,9})\.(?:mlp|block_sparse_moe)\.gate\.weight$")


# ---------------------------------------------------------------------------------------------------- config
class HFFormatError(UserError, ValueError):
    """A folder that cannot be read as an HF Llama/Mixtral model: its files are malformed, out of range, or disagree
    with each other (one line, exit status 2; a ValueError too, as the unsupported-model errors always were)."""


# Bounds of config.json's numbers. Integers are widths and counts (no model has 2**31 of anything); the floats
# become float32 buffers and arithmetic, so they must be finite float32 numbers, normal ones for the epsilon.
MAX_CONFIG_INT = 2**31 - 1
_F32 = torch.finfo(torch.float32)


def _bad(field: str, value: Any, valid: str) -> HFFormatError:
    return HFFormatError(f"has a {CONFIG_NAME} whose {field} is {show(value)}: {valid}")


def _int_field(hf: dict[str, Any], field: str, default: Any = ..., *, nullable: bool = False) -> Any:
    """``hf[field]`` as a count: an integer (not a bool, not 4.0) in [1, MAX_CONFIG_INT]."""
    if field not in hf:
        if default is ...:
            raise HFFormatError(f"has a {CONFIG_NAME} without {field}")
        return default
    value = hf[field]
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(field, value, "must be an integer" + (" or null" if nullable else ""))
    if not 1 <= value <= MAX_CONFIG_INT:
        raise _bad(field, value, f"must be in [1, {MAX_CONFIG_INT}]")
    return value


def _float_field(hf: dict[str, Any], field: str, default: float, *, smallest: float = 0.0) -> float:
    """``hf[field]`` as a positive, finite float32 number (an int is fine; a bool or a string is not)."""
    value = hf.get(field, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(field, value, "must be a number")
    if not math.isfinite(value) or value <= 0:
        raise _bad(field, value, "must be a finite number > 0")
    if value > _F32.max or value < smallest:
        raise _bad(field, value, f"must lie in the float32 range [{smallest or _F32.tiny:.3g}, {_F32.max:.3g}]")
    return float(value)


def _bool_field(hf: dict[str, Any], field: str, default: bool) -> bool:
    value = hf.get(field, default)
    if value is None:
        return default
    if not isinstance(value, bool):  # bool("false") is True: a string here would silently mean the opposite
        raise _bad(field, value, "must be true or false")
    return value


def _str_field(hf: dict[str, Any], field: str) -> str | None:
    value = hf.get(field)
    if value is not None and not isinstance(value, str):
        raise _bad(field, value, "must be a string")
    return value


_ARCH_TYPES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral"}
# The dense families beside Llama, as DecoderModel configuration: the fields each one sets (llm.models.config)
_QWEN_FAMILIES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_ARCH_TYPES.update(_QWEN_FAMILIES)
# The rotary scalings DecoderModel implements and the rope_parameters keys each reads (-> ModelConfig field)
_ROPE_KEYS = {
    "default": {},
    "linear": {"factor": "rope_factor"},
    "llama3": {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
               "high_freq_factor": "rope_high_freq_factor",
               "original_max_position_embeddings": "rope_original_max_seq_len"},
}


def _rope_from_hf(rope: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's rope_* fields from ``rope_parameters``/``rope_scaling``; any key that would change the
    frequencies and is not implemented is refused by name."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise HFFormatError(f"uses unsupported rope scaling {show(rope)}: rope_type must be one of "
                            f"{', '.join(_ROPE_KEYS)}")
    fields: dict[str, Any] = {"rope_type": kind}
    for key, field in _ROPE_KEYS[kind].items():
        if key not in rope:
            raise HFFormatError(f"has rope_type {kind} without rope_parameters.{key}")
        if key == "original_max_position_embeddings":
            fields[field] = _int_field(rope, key)
        else:
            fields[field] = _float_field(rope, key, 1.0)
    if kind == "llama3" and not fields["rope_low_freq_factor"] < fields["rope_high_freq_factor"]:
        raise _bad("rope_parameters.high_freq_factor", rope["high_freq_factor"],
                   f"must be > low_freq_factor={show(rope['low_freq_factor'])}")
    # attention_factor etc. change cos/sin; partial_rotary_factor 1.0 is the plain embedding
    unknown = sorted(set(rope) - {"rope_type", "type", "rope_theta", *_ROPE_KEYS[kind]}
                     - ({"partial_rotary_factor"} if rope.get("partial_rotary_factor") == 1.0 else set()))
    if unknown:
        raise HFFormatError(f"uses unsupported rope_parameters.{unknown[0]} {show(rope[unknown[0]])} (rope_type "
                            f"{kind})")
    return fields


def _qwen_from_hf(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The fields a Qwen2/Qwen3 config.json adds to Llama's: q/k/v biases (Qwen2, always), QK-norm (Qwen3)."""
    if _bool_field(hf, "use_sliding_window", False):
        raise HFFormatError("has use_sliding_window true, which is not supported for Qwen models")
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types or ()):
        raise _bad("layer_types", layer_types, "only full_attention layers are supported")
    if family == "qwen3" and _bool_field(hf, "attention_bias", False):
        raise HFFormatError("has attention_bias true: Qwen3's output-projection bias is not supported")
    return {"qkv_bias": family == "qwen2", "qk_norm": family == "qwen3"}
# Families that are Llama/Mixtral plus fields of their own (issue 20); their class is kept as hf_architecture.
_ARCH_TYPES.update(MistralForCausalLM="mistral", Qwen3MoeForCausalLM="qwen3_moe")
_WINDOWED = ("mistral", "mixtral", "qwen3_moe")  # the model types whose sliding_window transformers applies


def _config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """DecoderModel keyword arguments from an HF Llama/Mixtral ``config.json`` dict; raises on what we lack.

    Every field is checked for its type and range (an `HFFormatError` naming the field and value), and fields that
    say one thing twice must agree: ``architectures`` and ``model_type``, ``rope_theta`` at the top and in
    ``rope_parameters``, ``head_dim`` and ``hidden_size / num_attention_heads``.
    """
    if not isinstance(hf, dict):
        raise HFFormatError(f"has a {CONFIG_NAME} that is a JSON {type(hf).__name__}, not an object")
    archs = hf.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise _bad("architectures", archs, "must be a list of class names")
    arch = (archs or [None])[0]
    model_type = _str_field(hf, "model_type")
    if arch not in _ARCH_TYPES and model_type not in _ARCH_TYPES.values():
        raise HFFormatError(f"is an unsupported architecture {arch or model_type!r}: expected one of "
                            f"{', '.join(_ARCH_TYPES)}")
    if arch in _ARCH_TYPES and model_type is not None and _ARCH_TYPES[arch] != model_type:
        raise HFFormatError(f"has a {CONFIG_NAME} that disagrees with itself: architectures names {arch} but "
                            f"model_type is {model_type!r}")
    family = _ARCH_TYPES.get(arch, model_type)  # type: ignore[arg-type]  (one of the two is known)
    qwen = family in (*_QWEN_FAMILIES.values(), "qwen3_moe")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise _bad("rope_parameters" if "rope_parameters" in hf else "rope_scaling", rope, "must be an object")
    rope_fields = _rope_from_hf(rope)
    if _str_field(hf, "hidden_act") not in (None, "silu"):
        raise HFFormatError(f"has an unsupported hidden_act {show(hf['hidden_act'])}: the MLP is SwiGLU (silu)")
    if (not qwen and _bool_field(hf, "attention_bias", False)) or _bool_field(hf, "mlp_bias", False):
        raise HFFormatError("has attention/MLP biases, which are not supported")
    hidden = _int_field(hf, "hidden_size")
    num_heads = _int_field(hf, "num_attention_heads")
    num_kv_heads = _int_field(hf, "num_key_value_heads", None, nullable=True) or num_heads
    if hidden % num_heads:
        raise _bad("hidden_size", hidden, f"must be divisible by num_attention_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise _bad("num_key_value_heads", num_kv_heads, f"must divide num_attention_heads={num_heads}")
    head_dim = _int_field(hf, "head_dim", None, nullable=True)
    if qwen and head_dim is not None:  # Qwen sets its head width independently of hidden_size / heads
        if head_dim % 2:
            raise _bad("head_dim", head_dim, "must be even: rotary embeddings split each head in halves")
    elif head_dim not in (None, hidden // num_heads):
        raise HFFormatError(f"has an unsupported head_dim {head_dim} != hidden_size / num_attention_heads "
                            f"({hidden} / {num_heads})")
    elif (hidden // num_heads) % 2:
        raise _bad("hidden_size", hidden, f"gives an odd head dimension {hidden // num_heads}, which rotary "
                                          "embeddings cannot split in halves")
    window = _sliding_window(hf, family)
    theta = _float_field(hf, "rope_theta", 10000.0)
    if "rope_theta" in rope:
        inner = _float_field(rope, "rope_theta", theta)
        if "rope_theta" in hf and inner != theta:
            raise HFFormatError(f"has a {CONFIG_NAME} that disagrees with itself: rope_theta is "
                                f"{show(hf['rope_theta'])} and rope_parameters.rope_theta is "
                                f"{show(rope['rope_theta'])}")
        theta = inner
    cfg: dict[str, Any] = dict(
        vocab_size=_int_field(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int_field(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=_int_field(hf, "intermediate_size"),
        max_seq_len=_int_field(hf, "max_position_embeddings", 2048),
        rope_theta=theta,
        norm_eps=_float_field(hf, "rms_norm_eps", 1e-6, smallest=_F32.tiny),
        tie_embeddings=_bool_field(hf, "tie_word_embeddings", False),
    )
    if rope_fields["rope_type"] != "default":
        cfg.update(rope_fields)
    if family in _QWEN_FAMILIES.values():
        by_type = {t: a for a, t in _QWEN_FAMILIES.items()}
        cfg.update(_qwen_from_hf(hf, family), hf_architecture=by_type[family])
    elif family == "qwen3_moe":  # Qwen3's attention: QK-norm, no biases
        if _bool_field(hf, "attention_bias", False):
            raise HFFormatError("has attention_bias true: Qwen3's output-projection bias is not supported")
        cfg.update(qk_norm=True)
    if qwen and head_dim is not None and head_dim != hidden // num_heads:
        cfg["head_size"] = head_dim
    if family == "mixtral":
        experts, top_k = _int_field(hf, "num_local_experts"), _int_field(hf, "num_experts_per_tok")
        if top_k > experts:
            raise _bad("num_experts_per_tok", top_k, f"must be <= num_local_experts={experts}")
        cfg.update(use_moe=True, num_experts=experts, top_k=top_k, moe_intermediate_size=cfg["intermediate_size"])
    elif family == "qwen3_moe":
        cfg.update(_qwen3_moe_fields(hf, cfg["num_layers"]))
    if window is not None:
        cfg["sliding_window"] = window
    if family in ("mistral", "qwen3_moe"):
        cfg["hf_architecture"] = next(a for a, t in _ARCH_TYPES.items() if t == family)
    return cfg


def _rope_to_hf(c: Any) -> dict[str, Any]:
    """``rope_parameters`` for ``c``'s rotary embedding, with its scaling."""
    rope: dict[str, Any] = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    for key, field in _ROPE_KEYS[c.rope_type].items():
        rope[key] = getattr(c, field)
    return rope


def _sliding_window(hf: dict[str, Any], family: str) -> int | None:
    """The window transformers applies for this ``config.json``: ``sliding_window`` for Mistral and Mixtral,
    for Qwen only under ``use_sliding_window``; a Llama config that sets one is refused (Llama has none)."""
    if family in ("qwen2", "qwen3", "qwen3_moe") and not _bool_field(hf, "use_sliding_window", False):
        return None  # Qwen writes a window it does not use
    if family in ("qwen2", "qwen3"):  # their window applies to some layers only (max_window_layers)
        raise HFFormatError("has use_sliding_window true, which is not supported for Qwen2/Qwen3 models")
    if family not in _WINDOWED:
        if hf.get("sliding_window"):
            raise _bad("sliding_window", hf["sliding_window"], f"{family} has no sliding window (Mistral has one)")
        return None
    return _int_field(hf, "sliding_window", None, nullable=True)


def _qwen3_moe_fields(hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE ``config.json``: fine-grained experts (``moe_intermediate_size``), the gates'
    renormalisation, and which blocks are dense (``decoder_sparse_step``, ``mlp_only_layers``)."""
    # Qwen's own files say num_experts; transformers 5 writes it as num_local_experts (its attribute map)
    experts = _int_field(hf, "num_experts", None) or _int_field(hf, "num_local_experts")
    if _int_field(hf, "num_local_experts", experts) != experts:
        raise HFFormatError(f"has a {CONFIG_NAME} that disagrees with itself: num_experts is {experts} and "
                            f"num_local_experts is {show(hf['num_local_experts'])}")
    top_k = _int_field(hf, "num_experts_per_tok")
    if top_k > experts:
        raise _bad("num_experts_per_tok", top_k, f"must be <= num_experts={experts}")
    dense = hf.get("mlp_only_layers") or []
    if not (isinstance(dense, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in dense)):
        raise _bad("mlp_only_layers", dense, "must be a list of layer indices")
    if any(not 0 <= i < num_layers for i in dense):
        raise _bad("mlp_only_layers", dense, f"must hold layer indices in [0, {num_layers})")
    # transformers' rule: block i is MoE unless listed in mlp_only_layers or (i + 1) % decoder_sparse_step != 0
    step = _int_field(hf, "decoder_sparse_step", 1)
    dense = sorted(set(dense) | {i for i in range(num_layers) if (i + 1) % step})
    return dict(use_moe=True, num_experts=experts, top_k=top_k,
                moe_intermediate_size=_int_field(hf, "moe_intermediate_size"),
                moe_norm_topk_prob=_bool_field(hf, "norm_topk_prob", False), moe_dense_layers=dense)


def _config_to_hf(model: DecoderModel) -> dict[str, Any]:
    c = model.config
    if not model.causal:
        raise ValueError("a bidirectional (causal=False) model has no Llama/Mixtral equivalent")
    if c.use_moe and c.num_shared_experts:
        raise ValueError("Mixtral has no shared experts; this model has num_shared_experts > 0")
    biased = [k for k, t in model.state_dict().items() if k.endswith("routing_bias") and t.any()]
    if biased:  # dropping it would change which experts every token picks
        raise ValueError(f"Mixtral's router has no routing bias; this model (moe_balance=aux_free) has one in "
                         f"{biased[0]} and {len(biased) - 1} other layer(s)")
    arch = _export_architecture(model)
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    hf: dict[str, Any] = dict(
        architectures=[arch],
        model_type=_ARCH_TYPES[arch],
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.moe_intermediate_size if c.use_moe else c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        # v5 reads rope_parameters, v4 reads rope_theta; writing both loads in either
        rope_parameters=_rope_to_hf(c),
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings,
        attention_dropout=0.0,
        dtype=dtype,
        torch_dtype=dtype,
        use_cache=True,
    )
    if c.rope_type != "default":  # transformers 4.x reads the scaling from rope_scaling
        hf["rope_scaling"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
    if arch in _QWEN_FAMILIES:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers,
                  layer_types=["full_attention"] * c.num_layers)
        if arch == "Qwen3ForCausalLM":
            hf.update(attention_bias=False)
    elif arch == "Qwen3MoeForCausalLM":
        hf.update(intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
                  num_experts=c.num_experts, num_experts_per_tok=c.top_k, norm_topk_prob=c.moe_norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=list(c.moe_dense_layers),
                  use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                  attention_bias=False, output_router_logits=False)
    elif c.use_moe:
        hf.update(num_local_experts=c.num_experts, num_experts_per_tok=c.top_k, sliding_window=c.sliding_window,
                  router_jitter_noise=0.0, output_router_logits=False)
    elif arch == "MistralForCausalLM":
        hf.update(sliding_window=c.sliding_window)
    else:
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return hf


def _export_architecture(model: DecoderModel) -> str:
    """The HF class ``model`` is written as: the one it came from (``hf_architecture``), else Qwen3-MoE or Mixtral
    (MoE), Mistral (a sliding window) or Llama. A model that class would compute differently is refused (a
    ValueError naming the field), never dropped."""
    c = model.config
    qwen_moe = not c.moe_norm_topk_prob or bool(c.moe_dense_layers)
    arch = c.hf_architecture or ("Qwen3MoeForCausalLM" if c.use_moe and qwen_moe else
                                 "MixtralForCausalLM" if c.use_moe else
                                 "MistralForCausalLM" if c.sliding_window is not None else "LlamaForCausalLM")
    if arch not in _ARCH_TYPES:
        raise ValueError(f"hf_architecture {arch!r} is not one the export writes ({', '.join(_ARCH_TYPES)})")
    family = _ARCH_TYPES[arch]
    if c.use_moe != (family in ("mixtral", "qwen3_moe")):
        raise ValueError(f"a {'MoE' if c.use_moe else 'dense'} model cannot be written as {arch}")
    if arch == "MixtralForCausalLM" and qwen_moe:
        raise ValueError("Mixtral renormalises the top-k gates of every block's MoE; this model has "
                         "moe_norm_topk_prob false or moe_dense_layers (Qwen3MoeForCausalLM's)")
    if family in ("llama", "qwen2", "qwen3") and c.sliding_window is not None:
        raise ValueError(f"{arch} has no sliding window here; this model has sliding_window set (write it as Mistral)")
    wanted = {"qkv_bias": family == "qwen2", "qk_norm": family in ("qwen3", "qwen3_moe")}
    for name, value in wanted.items():
        if getattr(c, name) != value:
            raise ValueError(f"{arch} has {name} {value}, but this model has {name} {getattr(c, name)}")
    if family not in ("qwen2", "qwen3", "qwen3_moe") and c.head_dim != c.hidden_size // c.num_heads:
        raise ValueError(f"{arch} has no head width of its own; this model has head_size {c.head_size}")
    return arch


# ---------------------------------------------------------------------------------------------------- files
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes weights can have
_TIE_CHUNK_BYTES = 64 * 2**20  # tied embeddings stored twice are compared this much at a time


@dataclass(frozen=True)
class HFWeights:
    """The safetensors files of a folder and what their headers hold, checked against each other and the index."""

    files: tuple[Path, ...]
    shapes: dict[str, tuple[int, ...]]  # HF tensor name -> shape
    location: dict[str, Path]  # HF tensor name -> the file that holds it


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_json_file(path: Path) -> Any:
    """A JSON file of the folder, read as `llm.untrusted.read_json` does; errors are `HFFormatError` clauses."""
    try:
        return untrusted.read_json(path)
    except untrusted.UntrustedFileError as exc:
        raise HFFormatError(f"has a {path.name} that {exc.why}") from None


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of an HF folder as a dict (checked JSON; its fields are `_config_from_hf`'s to check)."""
    file = Path(path) / CONFIG_NAME
    if not untrusted.exists(file):
        raise HFFormatError(f"has no {CONFIG_NAME}")
    data = read_json_file(file)
    if not isinstance(data, dict):
        raise HFFormatError(f"has a {CONFIG_NAME} that is a JSON {type(data).__name__}, not an object")
    return data


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _index_map(path: Path) -> dict[str, str]:
    """The index's tensor -> file map, every file a plain name in the folder (never a path out of it)."""
    index = read_json_file(path / INDEX_NAME)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise HFFormatError(f"has a {INDEX_NAME} without a weight_map object")
    metadata = index.get("metadata", {})
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    if not isinstance(metadata, (dict, type(None))) or not (total is None or isinstance(total, int)
                                                            and not isinstance(total, bool) and total >= 0):
        raise HFFormatError(f"has a {INDEX_NAME} whose metadata.total_size is {show(total)}: must be an integer >= 0")
    for tensor, name in weight_map.items():
        if not _plain_name(name):
            raise HFFormatError(f"has a {INDEX_NAME} that puts {show(tensor)} in {show(name)}, which is not the name "
                                "of a file in the folder")
    return weight_map


def weight_files(path: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a folder (and its index's tensor -> file map, None without an index); missing
    shards of an index are an error, not a partial model, and every file must be a regular one (a FIFO would
    block the reader forever)."""
    path = Path(path)
    weight_map = None
    if untrusted.exists(path / INDEX_NAME):
        weight_map = _index_map(path)
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not untrusted.exists(path / name)]
        if missing:
            raise HFFormatError(f"is missing weight files listed in {INDEX_NAME}: {', '.join(missing[:3])}")
        files = [path / name for name in names]
    elif untrusted.exists(path / SINGLE_NAME):
        files = [path / SINGLE_NAME]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise HFFormatError(f"holds no weights: no {SINGLE_NAME}, no {INDEX_NAME} and no *.safetensors")
    for file in files:
        try:
            untrusted.check_regular(file)
        except untrusted.UntrustedFileError as exc:
            raise HFFormatError(f"has a weight file {file.name} that {exc.why}") from None
    return files, weight_map


def scan_weights(path: str | Path) -> HFWeights:
    """Read the headers of a folder's weight files (no tensor data): each tensor's shape and file, refusing a tensor
    held twice, one that is not floating-point, and any disagreement between the index and the files."""
    files, weight_map = weight_files(path)
    shapes: dict[str, tuple[int, ...]] = {}
    location: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                header = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 - not iterable
                found = {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in header.items()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise HFFormatError(f"has a weight file {file.name} that is not safetensors: {_first_line(exc)}") from None
        for key, (shape, dtype) in found.items():
            if key in location:
                raise HFFormatError(f"holds {show(key)} twice, in {location[key].name} and {file.name} (which is "
                                    "meant?)")
            if weight_map is not None and weight_map.get(key) != file.name:
                where = f"puts it in {show(weight_map[key])}" if key in weight_map else "does not list it"
                raise HFFormatError(f"has {show(key)} in {file.name}, but its {INDEX_NAME} {where}")
            if dtype not in FLOAT_DTYPES:
                raise HFFormatError(f"has a tensor {show(key)} of dtype {dtype} in {file.name}: weights are "
                                    f"floating-point ({', '.join(FLOAT_DTYPES)})")
            shapes[key], location[key] = shape, file
    if weight_map is not None:
        absent = [key for key in weight_map if key not in location]
        if absent:
            raise HFFormatError(f"has a {INDEX_NAME} that lists {show(absent[0])} in {show(weight_map[absent[0]])}, "
                                f"which does not hold it ({len(absent)} such tensor(s))")
    return HFWeights(tuple(files), shapes, location)


def _our_name(key: str) -> tuple[str, tuple[int, int, str] | None]:
    """DecoderModel's name for the HF tensor `key`, and for a per-expert weight (whose experts are stacked into
    one tensor) its (layer, expert, w1|w2|w3) instead; an `HFFormatError` for a tensor neither model has."""
    if m := _EXPERT.match(key):
        return "", (int(m[1]), int(m[2]), m[3])
    if m := _QWEN_EXPERT.match(key):
        return "", (int(m[1]), int(m[2]), _QWEN_AS_MIXTRAL[m[3]])
    if m := _FUSED.match(key):
        return f"layers.{m[1]}.mlp.{'w_gate_up' if m[2] == 'gate_up_proj' else 'w_down'}", None
    if m := _ROUTER.match(key):
        return f"layers.{m[1]}.mlp.gate.weight", None
    if key.startswith("model."):
        return key.removeprefix("model."), None
    if key == "lm_head.weight":
        return key, None
    raise HFFormatError(f"holds an unexpected tensor {show(key)} for a Llama/Mixtral model")


def _shapes_from_hf(shapes: dict[str, tuple[int, ...]], cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes `_state_dict_from_hf` would make, in DecoderModel's names, from the headers alone."""
    out: dict[str, tuple[int, ...]] = {}
    experts: dict[int, dict[int, dict[str, tuple[int, ...]]]] = {}
    for key, shape in shapes.items():
        name, expert = _our_name(key)
        if expert is not None:
            experts.setdefault(expert[0], {}).setdefault(expert[1], {})[expert[2]] = shape
        elif _FUSED.match(key):
            if len(shape) != 3:
                raise HFFormatError(f"has {key} of shape {shape}: fused experts are (experts, rows, columns)")
            out[name] = (shape[0], *shape[:0:-1])
        else:
            out[name] = shape
    count = cfg.get("num_experts") if cfg.get("use_moe") else None
    for layer, per in sorted(experts.items()):
        if count is None:
            raise HFFormatError(f"holds per-expert weights (layer {layer}) but its {CONFIG_NAME} describes a dense "
                                "model")
        if len(per) != count or max(per) != count - 1:  # indices are distinct: this is per == range(count)
            raise HFFormatError(f"holds {len(per)} expert(s) in layer {layer} (numbered up to {max(per)}) but its "
                                f"{CONFIG_NAME} has num_local_experts {count}")
        first = per[0].get("w1")
        for e, names in per.items():
            if set(names) != {"w1", "w2", "w3"}:
                raise HFFormatError(f"has incomplete per-expert weights in layer {layer}: expert {e} needs w1, w2 "
                                    "and w3")
            w1, w2, w3 = names["w1"], names["w2"], names["w3"]
            if len(w1) != 2 or w3 != w1 or w2 != w1[::-1] or w1 != first:
                raise HFFormatError(f"has per-expert weights of mismatched shapes in layer {layer}, expert {e}: "
                                    f"w1 {w1}, w2 {w2}, w3 {w3}")
        inter, hidden = first
        out[f"layers.{layer}.mlp.w_gate_up"] = (count, hidden, 2 * inter)
        out[f"layers.{layer}.mlp.w_down"] = (count, inter, hidden)
    return out


def _layer_count(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(how many distinct layer indices the tensor names hold, the largest; -1 for none)."""
    layers = {int(m[1]) for key in shapes if (m := re.match(r"^model\.layers\.(\d{1,9})\.", key))}
    return len(layers), max(layers, default=-1)


def check_weights(cfg: dict[str, Any], weights: HFWeights) -> None:
    """Refuse a ``config.json`` that disagrees with the weights: a layer or expert count, any tensor's shape, a tensor
    the config has no place for or lacks, and a tie flag the weights contradict. Tied embeddings stored under both
    names must hold the same values (compared in chunks: bounded memory)."""
    count, largest = _layer_count(weights.shapes)
    if count != cfg["num_layers"] or largest != count - 1:
        raise HFFormatError(f"has a {CONFIG_NAME} whose num_hidden_layers is {cfg['num_layers']} but weights for "
                            f"{count} layer(s) (numbered up to {largest})")
    ours = _shapes_from_hf(weights.shapes, cfg)
    try:
        with torch.device("meta"):  # shapes only; the counts are those of the files, so this is bounded
            expected = {k: tuple(v.shape) for k, v in DecoderModel(**cfg).state_dict().items()
                        if not k.endswith("routing_bias")}
    except (ValueError, TypeError, AssertionError, UserError) as exc:
        raise HFFormatError(f"has a {CONFIG_NAME} that describes no valid model: {_first_line(exc)}") from None
    both = "embed_tokens.weight" in ours and "lm_head.weight" in ours
    if cfg["tie_embeddings"]:
        tied = ours.get("embed_tokens.weight", ours.get("lm_head.weight"))
        if tied is not None:
            ours.setdefault("embed_tokens.weight", tied)
            ours.setdefault("lm_head.weight", tied)
    elif "embed_tokens.weight" in ours and "lm_head.weight" not in ours:
        raise HFFormatError(f"has a {CONFIG_NAME} whose tie_word_embeddings is false (or unset) but weights without "
                            "lm_head.weight: set it to true if the output layer shares the embedding")
    for name, shape in expected.items():
        if name not in ours:
            raise HFFormatError(f"lacks the weight {name} that its {CONFIG_NAME} implies")
        if ours[name] != shape:
            raise HFFormatError(f"has {name} of shape {ours[name]} but its {CONFIG_NAME} implies {shape}")
    extra = sorted(set(ours) - set(expected))
    if extra:
        raise HFFormatError(f"holds {extra[0]} (and {len(extra) - 1} more), which its {CONFIG_NAME} has no place for")
    if cfg["tie_embeddings"] and both:
        _check_tied_copies(weights)


def _check_tied_copies(weights: HFWeights) -> None:
    """A tied model stored with both names: the two must be one matrix, or the flag and the files disagree."""
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    with safe_open(str(weights.location[embed]), framework="pt") as a, \
            safe_open(str(weights.location[head]), framework="pt") as b:
        rows, cols = weights.shapes[embed]
        step = max(1, _TIE_CHUNK_BYTES // (8 * max(cols, 1)))
        for start in range(0, rows, step):
            x, y = a.get_slice(embed)[start:start + step], b.get_slice(head)[start:start + step]
            if x.dtype != y.dtype or not torch.equal(x, y):
                raise HFFormatError(f"has a {CONFIG_NAME} whose tie_word_embeddings is true but an lm_head.weight "
                                    f"that differs from the embedding (row {start} onwards): which one is meant?")


def read_hf_folder(path: str | Path) -> tuple[dict[str, Any], HFWeights]:
    """The checked DecoderModel keyword arguments and weight files of an HF folder (headers read, no tensor data)."""
    cfg = _config_from_hf(read_hf_config(path))
    weights = scan_weights(path)
    check_weights(cfg, weights)
    return cfg, weights


# ---------------------------------------------------------------------------------------------------- tensors
def read_tensors(weights: HFWeights) -> dict[str, Tensor]:
    """Every tensor of the checked files (each file checked to be regular again: it may have been swapped)."""
    tensors: dict[str, Tensor] = {}
    for file in weights.files:
        untrusted.check_regular(file)
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                tensors[key] = f.get_tensor(key)
    return tensors


def _state_dict_from_hf(hf: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """HF tensor names/layouts -> DecoderModel state_dict."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[int, int], dict[str, Tensor]] = {}
    for key, t in hf.items():
        name, expert = _our_name(key)
        if expert is not None:
            experts.setdefault(expert[:2], {})[expert[2]] = t
        elif _FUSED.match(key):
            out[name] = t.transpose(1, 2).contiguous()  # (E, H, 2I) / (E, I, H)
        else:
            out[name] = t
    for layer in sorted({i for i, _ in experts}):
        per = [experts.get((layer, e)) for e in range(cfg["num_experts"])]
        if any(p is None or set(p) != {"w1", "w2", "w3"} for p in per):
            raise KeyError(f"layer {layer}: incomplete per-expert weights (need w1, w2, w3 for each expert)")
        # w1/w3 (I, H) -> (H, 2I) with gate first, as MoELayer splits it; w2 (H, I) -> (I, H)
        out[f"layers.{layer}.mlp.w_gate_up"] = torch.stack([torch.cat([p["w1"].T, p["w3"].T], 1) for p in per])
        out[f"layers.{layer}.mlp.w_down"] = torch.stack([p["w2"].T for p in per]).contiguous()
    return out


def _state_dict_to_hf(model: DecoderModel) -> dict[str, Tensor]:
    """DecoderModel state_dict -> HF names/layouts (per-expert Mixtral form); tied lm_head left out."""
    out: dict[str, Tensor] = {}
    inter = model.config.moe_intermediate_size
    qwen = _export_architecture(model) == "Qwen3MoeForCausalLM"  # per-expert names mlp.experts.E.gate_proj, ...
    for key, t in model.state_dict().items():
        t = t.detach()
        if key == "lm_head.weight":
            if not model.config.tie_embeddings:
                out[key] = t
        elif key.endswith("routing_bias"):
            continue  # all zero (checked by _config_to_hf): routing is the router's alone, as in Mixtral
        elif m := re.match(r"^layers\.(\d+)\.mlp\.gate\.weight$", key):
            out[f"model.layers.{m[1]}.{'mlp' if qwen else 'block_sparse_moe'}.gate.weight"] = t
        elif m := re.match(r"^layers\.(\d+)\.mlp\.(w_gate_up|w_down)$", key):
            prefix = f"model.layers.{m[1]}.{'mlp' if qwen else 'block_sparse_moe'}.experts"
            w1, w2, w3 = ("gate_proj", "down_proj", "up_proj") if qwen else ("w1", "w2", "w3")
            for e, w in enumerate(t):
                if m[2] == "w_gate_up":  # (H, 2I)
                    out[f"{prefix}.{e}.{w1}.weight"] = w[:, :inter].T.clone()
                    out[f"{prefix}.{e}.{w3}.weight"] = w[:, inter:].T.clone()
                else:  # (I, H)
                    out[f"{prefix}.{e}.{w2}.weight"] = w.T.clone()
        else:
            out[f"model.{key}"] = t
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------- API
def load_hf(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> DecoderModel:
    """DecoderModel from a ``save_pretrained`` Llama/Mixtral directory. ``dtype`` None keeps the file's dtype.

    The folder is checked before any tensor is read (`read_hf_folder`): a malformed, out-of-range or
    self-contradicting file is an `HFFormatError` naming the field and value. ``config.json``'s ``torch_dtype`` is
    a note, not a promise: the tensors' own dtypes are what the model gets.
    """
    try:
        cfg, weights = read_hf_folder(path)
        state = _state_dict_from_hf(read_tensors(weights), cfg)
    except HFFormatError as exc:
        raise HFFormatError(f"{str(path)!r} {exc}") from None
    except (OSError, SafetensorError, untrusted.UntrustedFileError) as exc:
        raise HFFormatError(f"{str(path)!r} has weights that cannot be read: {_first_line(exc)}") from None
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    return DecoderModel.from_state_dict(state, **cfg)


def generation_config(model: DecoderModel, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """``generation_config.json``: the special token ids and the model's context as ``max_length``."""
    return {**{k: v for k, v in token_ids.items() if v is not None}, "max_length": model.config.max_seq_len,
            "_from_model_config": False}


def save_hf(model: DecoderModel, path: str | Path, max_shard_bytes: int | None = None,
            token_ids: dict[str, int | None] | None = None) -> None:
    """Write ``model`` as an HF Llama (dense) or Mixtral (MoE) directory that ``from_pretrained`` loads.

    ``max_shard_bytes`` splits the weights into ``model-0000i-of-0000n.safetensors`` files plus an index.
    ``token_ids`` (``bos_token_id``/``eos_token_id``/``pad_token_id``) go into ``config.json`` and a
    ``generation_config.json``, so that ``generate`` stops and pads as the tokenizer expects.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = _config_to_hf(model)
    tensors = _state_dict_to_hf(model)
    if token_ids is not None:
        hf_config.update({k: v for k, v in token_ids.items() if v is not None})
        text = json.dumps(generation_config(model, token_ids), indent=2) + "\n"
        (path / "generation_config.json").write_text(text)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if max_shard_bytes is None:
        save_file(tensors, str(path / SINGLE_NAME), metadata={"format": "pt"})
        return
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
