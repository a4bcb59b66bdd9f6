"""LoRA adapters on a `DecoderModel`, made by peft: only the adapters train, the base weights stay bitwise as built.

`apply_lora(model, rank=..., alpha=..., dropout=..., targets=...)` injects peft's LoRA layers in place
(`peft.LoraConfig` + `peft.inject_adapter_in_model`; the adapter math is peft's, none is written here) into the
`nn.Linear` modules whose names end with one of ``targets`` (default: every attention and MLP projection,
``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``). peft freezes everything else, so the optimizer (which
takes trainable parameters only) holds state for the adapters alone. MoE experts keep their weights stacked in
``w_gate_up`` / ``w_down`` parameters, which are not `nn.Linear` and are not adapted; an MoE layer's router is an
`nn.Linear` named ``gate`` (the MoE layer calls it whole once it is wrapped, so its adapter counts) and its shared
experts are an MLP, so those can be targeted by name. ``lm_head`` can be targeted when it is not tied to the
embedding; a tied one is refused (`check_targets`), since no tied model computes an adapted head.

What the adapted model's ``state_dict()`` holds (what a checkpoint saves):
- ``adapters_only=False`` (the base cannot be rebuilt, e.g. it was randomly initialised): every tensor, the base
  projections under peft's names (``...q_proj.base_layer.weight``) next to the adapters (``...q_proj.lora_A...``).
- ``adapters_only=True`` (the base is rebuilt from its source each run, `model.init_from`): the adapters only, a few
  percent of the model. Loading such a state restores the adapters and leaves the base as built; a base tensor is
  never reported missing, an adapter still is.
Loading a plain state dict (no adapter in it, e.g. base weights from elsewhere) into an adapted model fills the base
projections under their plain names and keeps the adapters as they are.

`merged_model(model)` is the plain model of the same class with every adapter folded into its base weight
(W + peft's ``get_delta_weight``), for export: the result has the plain names and loads anywhere without peft.
`exportable(model)` is that for an adapted model and the model itself otherwise.

An ``adapters_only`` model's checkpoints need the very base it was built on: `pin_base` (called when
`model.init_from` loads it) records the path and `base_sha256` of those tensors on the model, and
llm.artifacts.base_pin writes that record into each checkpoint's manifest and refuses a changed base on reading.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from llm.errors import ConfigError
from llm.models.decoder import DecoderModel

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # peft's adapter name; one adapter per model here
_ADAPTER_PART = "lora_"  # every tensor peft adds has it in its name (lora_A, lora_B, lora_embedding_A, ...)
_BASE_PART = ".base_layer."  # where peft moves the wrapped layer's own tensors
_ONLY_ADAPTERS = "_lora_adapters_only"  # attribute on the adapted root module: what its state_dict holds
_FULL_STATE = "_lora_full_state"  # set while `full_state` reads every tensor regardless
_SAW_ADAPTERS = "_lora_load_saw_adapters"  # set by the load pre-hook for the post-hook
_BASE_PIN = "_lora_base_pin"  # on an adapters_only model: {"path", "sha256"} of the base it was built on


def require_peft(field: str = "training.lora_rank") -> None:
    """ConfigError (naming ``field``) when peft is not installed."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{field}: LoRA adapters need peft, which is not installed: pip install 'llm[lora]'")


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` has LoRA adapters injected by `apply_lora`."""
    return hasattr(model, _ONLY_ADAPTERS)


def is_adapter_key(name: str) -> bool:
    return _ADAPTER_PART in name


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's `nn.Linear` modules (what LoRA can target)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of target names


def check_targets(model: nn.Module, targets: Sequence[str], field: str = "training.lora_targets") -> list[str]:
    """The targets that name an `nn.Linear` of ``model``. A target the user chose must name one; of the default
    ones, those the model has are kept (an MoE model has no MLP projections); the error lists the names there are.

    A tied LM head (``tie_embeddings``) is refused as a target: its adapter would change the output projection but
    not the input embedding it shares a tensor with, which no tied model computes, so no merge could equal it.
    Works on a model built on the meta device too (names only), so a run can check before it allocates anything."""
    names = linear_names(model)
    present = [t for t in targets if any(_matches(n, t) for n in names)]
    missing = [t for t in targets if t not in present]
    if missing and (list(targets) != list(DEFAULT_TARGETS) or not present):
        leaves = sorted({n.rpartition(".")[2] for n in names})
        raise ConfigError(
            f"{field}: {missing} name no nn.Linear of {type(model).__name__}; its linear layers are "
            f"{', '.join(leaves)} (MoE experts are stacked weights, not nn.Linear, and cannot be adapted)"
        )
    tied = [t for t in present if any(_matches(n, t) for n in _tied_heads(model))]
    if tied:
        raise ConfigError(
            f"{field}: {tied} adapts the LM head, which is tied to the input embedding (model.tie_embeddings): the "
            "adapted head would no longer equal the embedding, so no tied model (and no merged export) could "
            "compute it; leave lm_head out of the targets, or train a model with untied embeddings"
        )
    return present


def _tied_heads(model: nn.Module) -> list[str]:
    """Names of the `nn.Linear` modules whose weight is the very tensor of an `nn.Embedding` of ``model``."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) in embeddings]


def apply_lora(
    model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0, targets: Sequence[str] = DEFAULT_TARGETS,
    adapters_only: bool = False,
) -> nn.Module:
    """Inject LoRA adapters of ``rank`` into ``model`` in place and freeze everything else; returns ``model``.

    Adapters start as peft initialises them (A random, B zero), so the adapted model computes exactly what the
    base did until it trains. ``adapters_only`` chooses what ``state_dict()`` holds (see the module docstring).
    """
    require_peft()
    if not isinstance(model, DecoderModel):
        raise ConfigError(
            f"training.lora_rank: LoRA adapts a DecoderModel (tasks lm, sft), this task built a {type(model).__name__}"
        )
    if is_adapted(model):
        raise ValueError("the model already has LoRA adapters")
    if rank < 1:
        raise ConfigError(f"training.lora_rank: invalid value {rank!r}; must be >= 1 to add adapters")
    targets = check_targets(model, targets)
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, param in model.named_parameters():  # peft freezes the base; make the contract explicit and checked
        param.requires_grad_(is_adapter_key(name))
    setattr(model, _ONLY_ADAPTERS, adapters_only)
    model.register_state_dict_post_hook(_state_dict_hook)
    model.register_load_state_dict_pre_hook(_load_pre_hook)
    model.register_load_state_dict_post_hook(_load_post_hook)
    return model


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter parameters by name."""
    return {n: p for n, p in model.named_parameters() if is_adapter_key(n)}


# ------------------------------------------------------------------------------------------------- state dicts
def _state_dict_hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if not getattr(module, _ONLY_ADAPTERS) or getattr(module, _FULL_STATE, False):
        return
    for key in [k for k in state if k.startswith(prefix) and not is_adapter_key(k[len(prefix):])]:
        del state[key]


def _load_pre_hook(
    module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
    missing: list[str], unexpected: list[str], errors: list[str],
) -> None:
    own = [k for k in state if k.startswith(prefix)]
    saw = any(is_adapter_key(k[len(prefix):]) for k in own)
    setattr(module, _SAW_ADAPTERS, saw)
    if saw:
        return
    # A plain state dict: the wrapped projections' tensors go to peft's base_layer names.
    for layer_name in _adapted_layers(module):
        for leaf in ("weight", "bias"):
            plain, based = f"{prefix}{layer_name}.{leaf}", f"{prefix}{layer_name}.base_layer.{leaf}"
            if plain in state and based not in state:
                state[based] = state.pop(plain)


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    missing = incompatible.missing_keys
    if getattr(module, _ONLY_ADAPTERS):  # the base is rebuilt each run, so the state need not hold it
        missing[:] = [k for k in missing if is_adapter_key(k)]
    if not getattr(module, _SAW_ADAPTERS, True):  # a plain state dict sets the base, the adapters stay
        missing[:] = [k for k in missing if not is_adapter_key(k)]


def _adapted_layers(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def full_state(model: nn.Module) -> Iterator[None]:
    """Within this block ``state_dict()`` holds every tensor, also of an ``adapters_only`` model."""
    setattr(model, _FULL_STATE, True)
    try:
        yield
    finally:
        setattr(model, _FULL_STATE, False)


# ----------------------------------------------------------------------------------------------------- export
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict: each adapted projection's weight is base + peft's delta (B @ A * scale)."""
    layers = {name: m for name, m in model.named_modules() if name in set(_adapted_layers(model))}
    with full_state(model), torch.no_grad():
        state = {k: v.detach() for k, v in model.state_dict().items() if not is_adapter_key(k)}
        for name, layer in layers.items():  # summed in fp32, kept in the base's dtype (fp32 adapters on a bf16 base)
            base = state[f"{name}.base_layer.weight"]
            state[f"{name}.base_layer.weight"] = (base.float() + layer.get_delta_weight(ADAPTER).float()).to(base.dtype)
    return {k.replace(_BASE_PART, "."): v for k, v in state.items()}


def merged_model(model: nn.Module) -> nn.Module:
    """A plain copy of an adapted ``model`` (same class and config) with the adapters merged; ``model`` is untouched.

    The model class must offer ``from_state_dict(state, config, causal=...)`` as `DecoderModel` does."""
    if not is_adapted(model):
        raise ValueError("the model has no LoRA adapters to merge")
    plain = type(model).from_state_dict(merged_state_dict(model), model.config, causal=getattr(model, "causal", True))
    plain.train(model.training)
    return plain


def exportable(model: nn.Module) -> nn.Module:
    """What a run's final weights file holds: the merged plain model for an adapted ``model``, else ``model``."""
    return merged_model(model) if is_adapted(model) else model


# ------------------------------------------------------------------------------------------------- the base pin
def base_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors: of one line per tensor in name order, its name, dtype, shape and the
    sha256 of its raw bytes (C order).

    The same tensors give the same digest whatever files or shards held them; one changed value, name, dtype or
    shape gives another. The tensors are hashed on several threads (hashlib releases the GIL), each read once in
    place (a contiguous CPU tensor is not copied): about 0.4 GB/s per core.
    """
    names = sorted(state)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda name: _tensor_sha256(state[name]), names))
    lines = (f"{name}\0{str(state[name].dtype).removeprefix('torch.')}\0{list(state[name].shape)}\0{digest}\n"
             for name, digest in zip(names, digests))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def pin_base(model: nn.Module, path: str, state: Mapping[str, torch.Tensor]) -> None:
    """Record on an ``adapters_only`` adapted ``model`` the base weights it was built on (``state``, read from
    ``path``), which its checkpoints do not hold: `base_pin` returns the record. Other models are left alone."""
    if is_adapted(model) and getattr(model, _ONLY_ADAPTERS):
        setattr(model, _BASE_PIN, {"path": str(path), "sha256": base_sha256(state)})


def base_pin(model: nn.Module) -> dict[str, str] | None:
    """``{"path", "sha256"}`` of the base an adapters-only model was built on (`pin_base`); None for any other."""
    pin = getattr(model, _BASE_PIN, None)
    return dict(pin) if pin is not None else None
