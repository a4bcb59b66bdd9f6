"""Starting a model from existing weights (``model.init_from``): what a source is, HF folders, loading the weights.

A source is a Hugging Face Llama/Mixtral folder (``config.json``, ``model.safetensors`` or shards with
``model.safetensors.index.json``, ``tokenizer.json``) or one of our run or checkpoint directories. Every source
reads into an `InitSource`: the `ModelConfig` fields of its shape, its tokenizer and a loader of its weights in
DecoderModel's names. HF folders are read here, through hf.py's conversion; our own runs are read by
`llm.artifacts.runs.read_init_source`, which dispatches here for HF folders. That split is the layering rule
(models never import training): the run-directory loader stays next to the checkpoint format.

Initialising is not resuming: only the weights come from the source; the optimizer, the schedule, the step and the
data position start fresh. Every problem with a source is one `InitFromError` line naming ``model.init_from``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from llm import untrusted
from llm.errors import UserError, show
from llm.models.config import ModelConfig
from llm.models.decoder import DecoderModel
from llm.models.hf import (
    MAX_CONFIG_INT,
    HFFormatError,
    _config_from_hf,
    _state_dict_from_hf,
    check_weights,
    read_hf_config,
    read_tensors,
    scan_weights,
)
from llm.models.lora import pin_base

HF_CONFIG = "config.json"  # = llm.models.hf.CONFIG_NAME
TOKENIZER_FILE = "tokenizer.json"  # the name llm.data.tokenizers uses too (models do not import data)
HF_MODEL_TYPES = ("llama", "mixtral", "mistral", "qwen2", "qwen3", "qwen3_moe")
# The fields that make the weights what they are: a run adopts them from its source, and a value the user sets
# must agree. max_seq_len is adopted too but may be changed (RoPE has no learned positions); dropout and the MoE
# loss coefficients are training choices, not part of the source.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "use_moe", "num_experts", "top_k", "moe_intermediate_size", "num_shared_experts", "rope_theta",
                "norm_eps", "tie_embeddings",
                # the HF family variants (issue 20): scaled rotary, q/k/v biases, QK-norm, head width, sliding
                # window, Qwen3-MoE's gates and dense blocks, export class
                "hf_architecture", "rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_seq_len", "qkv_bias", "qk_norm", "head_size", "sliding_window",
                "moe_norm_topk_prob", "moe_dense_layers")
ADOPTED_FIELDS = (*SHAPE_FIELDS, "max_seq_len")


class InitFromError(UserError):
    """``model.init_from`` names something that cannot be started from (one line, exit status 2)."""


def init_error(path: str | Path, why: str) -> InitFromError:
    return InitFromError(f"model.init_from: {str(path)!r} {why}")


@dataclass(frozen=True)
class InitSource:
    """What `model.init_from` names, read far enough to configure a run; the weights are read on demand."""

    path: Path
    kind: str  # "hf" (a Hugging Face folder) or "run" (our run or checkpoint directory)
    model: dict[str, Any]  # DecoderModel's keyword arguments for the source (resolved; no preset, no init_from)
    tokenizer: str  # "byte", the path of the source's tokenizer.json, or "" (it has none)
    read_weights: Callable[[], dict[str, Tensor]]  # the weights in DecoderModel's names, on the CPU
    seq_len: int | None = None  # the source's training window (our runs), a default for evaluation
    precision: str | None = None  # the source run's training.precision (our runs), what evaluation scores it with


def model_fields(config: ModelConfig) -> dict[str, Any]:
    """The keyword arguments that rebuild ``config``'s model, derived widths resolved, without the fields that only
    record where values came from (``preset``, ``init_from``)."""
    fields = dataclasses.asdict(config.resolved())
    return {name: value for name, value in fields.items() if name not in ("preset", "init_from")}


# ------------------------------------------------------------------------------------------------ checks
_COUNT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                 "max_seq_len", "num_experts", "top_k", "moe_intermediate_size")
_LAYER = re.compile(r"^layers\.(\d{1,9})\.")


def model_field_problem(fields: dict[str, Any]) -> str | None:
    """What is wrong with a source's model fields (None: nothing), as ``"model.FIELD is VALUE: why"``.

    A source's config is a file like any other: a count must be an integer in [1, 2**31) (not a bool, not 4.0), the
    rotary base and the norm epsilon finite float32 numbers > 0, and the flags booleans. Checked before the fields
    configure a run, so that no value of a source file reaches the model's constructor unchecked.
    """
    for name in _COUNT_FIELDS:
        value = fields.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CONFIG_INT:
            return f"model.{name} is {show(value)}: must be an integer in [1, {MAX_CONFIG_INT}]"
    shared = fields.get("num_shared_experts", 0)
    if not isinstance(shared, int) or isinstance(shared, bool) or not 0 <= shared <= MAX_CONFIG_INT:
        return f"model.num_shared_experts is {show(shared)}: must be an integer in [0, {MAX_CONFIG_INT}]"
    f32 = torch.finfo(torch.float32)
    for name, smallest in (("rope_theta", 0.0), ("norm_eps", f32.tiny)):
        value = fields.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or value <= 0 or value < smallest or value > f32.max:
            return f"model.{name} is {show(value)}: must be a finite float32 number > 0"
    for name in ("tie_embeddings", "use_moe"):
        if not isinstance(fields.get(name, False), bool):
            return f"model.{name} is {show(fields.get(name))}: must be true or false"
    return None


def layer_count_problem(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Whether ``fields``' layer count is the weights' (DecoderModel's names ``layers.{i}.*``), from the names alone:
    checked before anything is built, so that a config claiming a million layers costs nothing."""
    layers = {int(m[1]) for name in shapes if (m := _LAYER.match(name))}
    if len(layers) != fields["num_layers"] or max(layers, default=-1) != len(layers) - 1:
        return (f"model.num_layers is {fields['num_layers']} but the weights hold {len(layers)} layer(s) "
                f"(numbered up to {max(layers, default=-1)})")
    return None


def model_shape_problem(fields: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """How the weights ``shapes`` (DecoderModel's names) disagree with the model ``fields`` describe (None: they
    agree). The layer count is compared first, from the names alone, so that a config claiming a million layers
    is refused without building them, even on the meta device."""
    problem = layer_count_problem(fields, shapes)
    if problem:
        return problem
    try:
        with torch.device("meta"):
            expected = DecoderModel(**fields).state_dict(keep_vars=True)
    except (ValueError, TypeError, AssertionError, UserError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the model fields describe no valid model: {why}"
    both = "embed_tokens.weight" in shapes and "lm_head.weight" in shapes
    if fields.get("tie_embeddings") and both:  # a tied model's file stores the matrix once: which copy is meant?
        return ("model.tie_embeddings is true but the weights hold embed_tokens.weight and lm_head.weight "
                "separately")
    tied = fields.get("tie_embeddings") and not both
    for name, tensor in expected.items():
        shape = shapes.get(name)
        if shape is None:
            if tied and name in ("embed_tokens.weight", "lm_head.weight") or name.endswith("routing_bias"):
                continue  # stored once (tied), or all zero unless the model balances by bias
            return f"the model implies a weight {name} that the weights lack"
        if tuple(shape) != tuple(tensor.shape):
            return f"the model implies {name} of shape {tuple(tensor.shape)} but the weights hold {tuple(shape)}"
    extra = sorted(set(shapes) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"the model has no place for the weight {extra[0]}{more}"
    return None


# ------------------------------------------------------------------------------------------------ HF folders
def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is meant as an HF folder: it has a ``config.json`` (of any kind: one that is a FIFO or
    malformed is this folder's error to report, not a reason to read the folder as something else)."""
    return untrusted.exists(Path(path) / HF_CONFIG)


def read_hf_source(path: str | Path) -> InitSource:
    """An HF Llama/Mixtral folder as an `InitSource`. Everything but the tensor data is checked now, before a run
    directory exists: config.json's fields (types, ranges, agreement with each other), the index, every weight
    file's header, and the config against the weights (`llm.models.hf.read_hf_folder`)."""
    path = Path(path)
    try:
        hf = read_hf_config(path)
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise HFFormatError(f"is an unsupported architecture: {HF_CONFIG} model_type {show(model_type)} "
                                f"(supported: {', '.join(HF_MODEL_TYPES)})")
        fields = _config_from_hf(hf)
        weights = scan_weights(path)
        check_weights(fields, weights)
    except HFFormatError as exc:
        raise init_error(path, str(exc)) from None
    model = model_fields(dataclasses.replace(ModelConfig(), **fields))

    def read() -> dict[str, Tensor]:
        try:
            return _state_dict_from_hf(read_tensors(weights), fields)
        except (OSError, SafetensorError, KeyError, ValueError, RuntimeError, UserError) as exc:
            raise init_error(path, f"has weights that cannot be read: {str(exc).splitlines()[0]}") from None

    tokenizer = path / TOKENIZER_FILE
    return InitSource(path, "hf", model, str(tokenizer) if untrusted.is_regular(tokenizer) else "", read)


# ------------------------------------------------------------------------------------------------ loading
def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def load_init_weights(model: nn.Module, source: InitSource) -> int:
    """Copy ``source``'s weights into ``model`` (any device and dtype); returns the number of tensors copied.

    The source must hold every tensor of its architecture, and each must fit a model tensor of the same name and
    shape. Model tensors the source lacks keep their initialisation: new ones a task added around the source's
    layers (adapters). The copy goes through ``model.load_state_dict``, so a model that maps plain names onto
    wrapped layers (llm.models.lora) receives them under the names it expects.
    """
    state = source.read_weights()
    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False):  # a tied checkpoint stores one of the two names
        tied = state.get("embed_tokens.weight", state.get("lm_head.weight"))
        if tied is not None:
            state.setdefault("embed_tokens.weight", tied)
            state.setdefault("lm_head.weight", tied)
    with torch.device("meta"):  # the names the source's own architecture has: all must be in its files
        expected = DecoderModel(**source.model).state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise init_error(source.path, f"is missing weights: {_listing(missing)}")
    own = model.state_dict()
    wrong = [f"{name} {tuple(t.shape)} vs {tuple(own[name].shape)}" for name, t in state.items()
             if name in own and t.shape != own[name].shape]
    if wrong:
        raise init_error(source.path, f"does not match the model's shape: {_listing(wrong)}")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a size mismatch under a name the model maps itself
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise init_error(source.path, f"does not fit the model: {lines[-1] if lines else exc}") from None
    if result.unexpected_keys:
        raise init_error(source.path, f"has weights this model has no place for: {_listing(result.unexpected_keys)} "
                                      "(a different architecture?)")
    unfilled = sorted(set(result.missing_keys) & set(expected))
    if unfilled:
        raise init_error(source.path, f"left model weights unfilled: {_listing(unfilled)}")
    pin_base(model, str(source.path), state)  # LoRA adapters saved without this base: their checkpoints pin it
    return len(state)
