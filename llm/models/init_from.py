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
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from llm.errors import UserError
from llm.models.config import ModelConfig
from llm.models.decoder import DecoderModel
from llm.models.hf import INDEX_NAME, SINGLE_NAME, _config_from_hf, _read_safetensors, _state_dict_from_hf

HF_CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"  # the name llm.data.tokenizers uses too (models do not import data)
HF_MODEL_TYPES = ("llama", "mixtral")
# The fields that make the weights what they are: a run adopts them from its source, and a value the user sets
# must agree. max_seq_len is adopted too but may be changed (RoPE has no learned positions); dropout and the MoE
# loss coefficients are training choices, not part of the source.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                "use_moe", "num_experts", "top_k", "moe_intermediate_size", "num_shared_experts", "rope_theta",
                "norm_eps", "tie_embeddings")
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


# ------------------------------------------------------------------------------------------------ HF folders
def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / HF_CONFIG).is_file()


def _read_hf_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise init_error(path, f"has an unreadable {HF_CONFIG}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise init_error(path, f"has a {HF_CONFIG} that is not a JSON object")
    model_type = data.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise init_error(path, f"is an unsupported architecture: {HF_CONFIG} model_type {model_type!r} "
                               f"(supported: {', '.join(HF_MODEL_TYPES)})")
    return data


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder; missing shards of an index are an error, not a partial model."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise init_error(path, f"has an unreadable {INDEX_NAME}") from None
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise init_error(path, f"is missing weight files listed in {INDEX_NAME}: {', '.join(missing[:3])}")
        return [path / name for name in names]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise init_error(path, f"holds no weights: no {SINGLE_NAME}, no {INDEX_NAME} and no *.safetensors")
    return files


def read_hf_source(path: str | Path) -> InitSource:
    """An HF Llama/Mixtral folder as an `InitSource` (its config and the list of weight files are checked now)."""
    path = Path(path)
    hf = _read_hf_config(path)
    try:
        fields = _config_from_hf(hf)
    except (ValueError, KeyError, TypeError) as exc:
        raise init_error(path, f"cannot be read as Llama/Mixtral: {str(exc).splitlines()[0]}") from None
    _weight_files(path)
    model = model_fields(dataclasses.replace(ModelConfig(), **fields))

    def read() -> dict[str, Tensor]:
        try:
            return _state_dict_from_hf(_read_safetensors(path), fields)
        except (OSError, SafetensorError, KeyError, ValueError, RuntimeError) as exc:
            raise init_error(path, f"has weights that cannot be read: {str(exc).splitlines()[0]}") from None

    tokenizer = path / TOKENIZER_FILE
    return InitSource(path, "hf", model, str(tokenizer) if tokenizer.is_file() else "", read)


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
    return len(state)
