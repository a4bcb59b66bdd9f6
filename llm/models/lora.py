"""LoRA adapters on a `DecoderModel`, made by peft: only the adapters train, the base weights stay bitwise as built.

`apply_lora(model, rank=..., alpha=..., dropout=..., targets=..., variant=..., quantize=...)` injects peft's LoRA
layers in place (`peft.LoraConfig` + `peft.inject_adapter_in_model`; the adapter math is peft's) into the
`nn.Linear` modules whose names end with one of ``targets``, and this project's stacked-expert adapters
(llm.models.lora_experts) onto the MoE expert weights those targets name. The targets (`TARGETS`, documented in
the README's "Adapters" section):
- attention and MLP projections ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` (the default; an MoE
  model has no dense MLP projections, so of the default ones those it has are kept); an MoE layer's shared experts
  are an MLP, so ``gate_proj up_proj down_proj`` reach them too;
- ``gate``: an MoE layer's router (the layer calls it whole once it is wrapped, so its adapter counts);
- ``w_gate_up``, ``w_down``: an MoE layer's routed experts, stacked (E, in, out): one low-rank pair per expert;
- ``lm_head`` when it is not tied to the embedding; a tied one is refused (`check_targets`), since no tied model
  computes an adapted head.
Variants (``variant``, peft's): ``lora``; ``rslora`` (scale alpha / sqrt(r) instead of alpha / r); ``dora``
(weight-decomposed: a learned magnitude per output column). peft freezes everything else, so the optimizer (which
takes trainable parameters only) holds state for the adapters alone. ``quantize="nf4"`` (QLoRA) keeps the frozen
base projections that carry adapters in 4-bit NF4 through bitsandbytes, on CUDA only (`check_quantize`).

What the adapted model's ``state_dict()`` holds (what a checkpoint saves):
- ``adapters_only=False`` (the base cannot be rebuilt, e.g. it was randomly initialised): every tensor, the base
  projections under peft's names (``...q_proj.base_layer.weight``) next to the adapters (``...q_proj.lora_A...``).
- ``adapters_only=True`` (the base is rebuilt from its source each run, `model.init_from`): the adapters only, a few
  percent of the model. Loading such a state restores the adapters and leaves the base as built; a base tensor is
  never reported missing, an adapter still is.
Loading a plain state dict (no adapter in it, e.g. base weights from elsewhere) into an adapted model fills the base
projections under their plain names and keeps the adapters as they are, except DoRA's magnitudes, which restart at
the new base's norms (so that the adapted model again computes the base until it trains).

`merged_model(model)` is the plain model of the same class with every adapter folded into its base weight
(`merge_state`, also what FSDP's gathered full state goes through), for export: the result has the plain names and
loads anywhere without peft. `exportable(model)` is that for an adapted model and the
model itself otherwise. `disabled(model)` is a context in which the model computes its base (peft's
``disable_adapter`` for a model that is not a ``PeftModel``): a reference model with no second copy in memory.
`describe(model)` is the run's start line: trainable / total parameters and the modules that carry adapters.

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
from llm.models.lora_experts import EXPERT_TARGETS, attach, expert_adapters, expert_parameter_names

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = (*DEFAULT_TARGETS, "gate", *EXPERT_TARGETS, "lm_head")  # every name a run may target (README, Adapters)
VARIANTS = ("lora", "dora", "rslora")
QUANTIZERS = ("none", "nf4")
ADAPTER = "default"  # peft's adapter name; one adapter per model here
_ADAPTER_PART = "lora_"  # every tensor peft adds has it in its name (lora_A, lora_B, lora_embedding_A, ...)
_BASE_PART = ".base_layer."  # where peft moves the wrapped layer's own tensors
_ONLY_ADAPTERS = "_lora_adapters_only"  # attribute on the adapted root module: what its state_dict holds
_FULL_STATE = "_lora_full_state"  # set while `full_state` reads every tensor regardless
_SAW_ADAPTERS = "_lora_load_saw_adapters"  # set by the load pre-hook for the post-hook
_BASE_PIN = "_lora_base_pin"  # on an adapters_only model: {"path", "sha256"} of the base it was built on
_REQUANTIZED = "_lora_requantized"  # base weights the last plain load quantized itself (QLoRA)
_SETTINGS = "_lora_settings"  # {"rank", "alpha", "variant", "quantize"} as applied, for `describe`


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
    """Qualified names of the model's `nn.Linear` modules (what peft's LoRA can target)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def target_names(model: nn.Module) -> list[str]:
    """Qualified names of everything LoRA can adapt in ``model``: its `nn.Linear` modules and stacked MoE experts."""
    return linear_names(model) + expert_parameter_names(model)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of target names


def check_targets(model: nn.Module, targets: Sequence[str], field: str = "training.lora_targets") -> list[str]:
    """The targets that name an `nn.Linear` or a stacked expert weight of ``model``. A target the user chose must name
    one; of the default ones, those the model has are kept (an MoE model has no MLP projections); the error lists
    the names there are.

    A tied LM head (``tie_embeddings``) is refused as a target: its adapter would change the output projection but
    not the input embedding it shares a tensor with, which no tied model computes, so no merge could equal it.
    Works on a model built on the meta device too (names only), so a run can check before it allocates anything."""
    names = target_names(model)
    present = [t for t in targets if any(_matches(n, t) for n in names)]
    missing = [t for t in targets if t not in present]
    if missing and (list(targets) != list(DEFAULT_TARGETS) or not present):
        leaves = sorted({n.rpartition(".")[2] for n in names})
        raise ConfigError(
            f"{field}: {missing} name no nn.Linear of {type(model).__name__} nor an MoE expert weight; its targets "
            f"are {', '.join(leaves)}"
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
    adapters_only: bool = False, variant: str = "lora", quantize: str = "none",
) -> nn.Module:
    """Inject LoRA adapters of ``rank`` into ``model`` in place and freeze everything else; returns ``model``.

    Adapters start as peft initialises them (A random, B zero; DoRA's magnitudes at the base's norms), so the
    adapted model computes exactly what the base did until it trains. ``adapters_only`` chooses what
    ``state_dict()`` holds (see the module docstring); ``variant`` is one of `VARIANTS`, ``quantize`` of
    `QUANTIZERS`.
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
    if variant not in VARIANTS:
        raise ConfigError(f"training.lora_variant: invalid value {variant!r}; expected one of {', '.join(VARIANTS)}")
    targets = check_targets(model, targets)
    experts = [t for t in targets if t in EXPERT_TARGETS]
    linears = [t for t in targets if t not in EXPERT_TARGETS]
    if experts and dropout:
        raise ConfigError(
            f"training.lora_dropout: invalid value {dropout!r} with expert targets {experts}: their adapters change "
            "the stacked weights, not a layer's inputs, so there is nothing to drop out; set 0 or leave them out"
        )
    check_quantize(quantize)
    if linears:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=linears, bias="none",
                            use_dora=variant == "dora", use_rslora=variant == "rslora")
        if quantize == "nf4":
            _quantize_bases(model, linears)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    if experts:
        attach(model, experts, rank, alpha, variant)
    for name, param in model.named_parameters():  # peft freezes the base; make the contract explicit and checked
        param.requires_grad_(is_adapter_key(name))
    setattr(model, _ONLY_ADAPTERS, adapters_only)
    setattr(model, _SETTINGS, {"rank": rank, "alpha": alpha, "variant": variant, "quantize": quantize})
    model.register_state_dict_post_hook(_state_dict_hook)
    model.register_load_state_dict_pre_hook(_load_pre_hook)
    model.register_load_state_dict_post_hook(_load_post_hook)
    return model


def quantize_unavailable(quantize: str, device: str = "auto") -> str | None:
    """Why ``quantize`` cannot load the frozen base here (None when it can): NF4 needs bitsandbytes and CUDA."""
    if quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        return "4-bit bases need bitsandbytes, which is not installed (pip install bitsandbytes)"
    if not torch.cuda.is_available():
        return "bitsandbytes' 4-bit layers need a CUDA device and this machine has none"
    if device not in ("auto", "") and torch.device(device).type != "cuda":
        return f"bitsandbytes' 4-bit layers need a CUDA device and the run trains on {device}"
    return None


def check_quantize(quantize: str, device: str = "auto") -> None:
    """ConfigError naming ``training.lora_quantize`` when ``quantize`` is unknown or cannot run here."""
    if quantize not in QUANTIZERS:
        raise ConfigError(f"training.lora_quantize: invalid value {quantize!r}; expected one of "
                          f"{', '.join(QUANTIZERS)}")
    why = quantize_unavailable(quantize, device)
    if why:
        raise ConfigError(f"training.lora_quantize: {quantize} is not available: {why}; use none")


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def _quantize_bases(model: nn.Module, targets: Sequence[str]) -> None:
    """Swap each targeted projection (`nn.Linear`) for a bitsandbytes NF4 `Linear4bit` holding its weight (quantized
    when the model moves to CUDA, and again whenever a plain state dict gives it new base weights: `_load_pre_hook`).
    An MoE router (``gate``) stays in full precision: it is tiny, and routing reads its weight's dtype."""
    import bitsandbytes as bnb

    quantized = [t for t in targets if t != "gate"]
    for name in [n for n in linear_names(model) if any(_matches(n, t) for t in quantized)]:
        parent_name, _, leaf = name.rpartition(".")
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=torch.bfloat16, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(old.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    model.is_loaded_in_4bit = True  # how peft knows to wrap Linear4bit layers with its 4-bit LoRA layer


def _requantize(layer: nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    device = layer.weight.device if layer.weight.device.type == "cuda" else torch.device("cuda")
    layer.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False, quant_type="nf4").to(device)


def _dequantized(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A base weight in full precision: dequantized from NF4 for a 4-bit layer, else as it is."""
    if not _is_4bit(layer):
        return weight
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)


def _is_quant_state(key: str) -> bool:
    """A bitsandbytes quantization-state entry (``...base_layer.weight.absmax``), not a weight of the plain model."""
    return ".weight." in key


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
    requantized = []
    for layer_name in _adapted_layers(module):
        for leaf in ("weight", "bias"):
            plain, based = f"{prefix}{layer_name}.{leaf}", f"{prefix}{layer_name}.base_layer.{leaf}"
            if plain in state and based not in state:
                state[based] = state.pop(plain)
        base = module.get_submodule(layer_name).get_base_layer()
        weight = f"{prefix}{layer_name}.base_layer.weight"
        if _is_4bit(base) and weight in state:  # QLoRA: new base weights are quantized, not copied into NF4 bytes
            _requantize(base, state.pop(weight))
            requantized.append(weight)
    setattr(module, _REQUANTIZED, requantized)


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    missing = incompatible.missing_keys
    if getattr(module, _ONLY_ADAPTERS):  # the base is rebuilt each run, so the state need not hold it
        missing[:] = [k for k in missing if is_adapter_key(k)]
    if not getattr(module, _SAW_ADAPTERS, True):  # a plain state dict sets the base, the adapters stay
        done = set(getattr(module, _REQUANTIZED, ()))
        missing[:] = [k for k in missing if not is_adapter_key(k) and k not in done]
        _reset_magnitudes(module)


def _reset_magnitudes(model: nn.Module) -> None:
    """DoRA: restart every magnitude at its (new) base's norms, as peft does when it injects the adapter."""
    for name in _adapted_layers(model):
        layer = model.get_submodule(name)
        magnitude = getattr(layer, "lora_magnitude_vector", {})
        if ADAPTER in magnitude:
            magnitude[ADAPTER].update_layer(base_layer=layer.get_base_layer(), lora_A=layer.lora_A[ADAPTER].weight,
                                            lora_B=layer.lora_B[ADAPTER].weight, scaling=layer.scaling[ADAPTER])
    for owner, param, adapter in expert_adapters(model).values():
        adapter.reset_magnitude(owner._parameters[param])


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


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within this block the adapted ``model`` computes its base alone (every peft layer and expert adapter off),
    as peft's ``PeftModel.disable_adapter()`` does: e.g. a preference task's reference model, no second copy."""
    layers = [model.get_submodule(n) for n in _adapted_layers(model)]
    experts = [adapter for _, _, adapter in expert_adapters(model).values()]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True  # not enable_adapters(False): that also flips requires_grad
    for adapter in experts:
        adapter.enabled = False
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was
        for adapter in experts:
            adapter.enabled = True


def describe(model: nn.Module) -> str | None:
    """One line for the run's start: trainable / total parameters and which modules carry adapters (None for a
    model without adapters). A DDP or compile wrapper is looked through; FSDP's sharded parameters count whole."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model) if not is_adapted(model) else model
    if not is_adapted(model):
        return None
    settings = getattr(model, _SETTINGS)
    total = sum(_weights_in(p) for p in model.parameters())
    trainable = sum(_weights_in(p) for p in model.parameters() if p.requires_grad)
    carriers = _adapted_layers(model) + list(expert_adapters(model))
    kinds: dict[str, int] = {}
    for name in carriers:
        leaf = name.rpartition(".")[2]
        kinds[leaf] = kinds.get(leaf, 0) + 1
    nf4 = " (base in NF4)" if settings["quantize"] == "nf4" else ""
    return (f"adapters: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%); "
            f"{settings['variant']} rank {settings['rank']} alpha {settings['alpha']:g}{nf4} on {len(carriers)} "
            "modules: " + ", ".join(f"{leaf} x{n}" for leaf, n in kinds.items()))


def _weights_in(param: torch.Tensor) -> int:
    """The weights a parameter holds: a bitsandbytes 4-bit one packs two per byte (its quant_state has the shape)."""
    state = getattr(param, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else param.numel()


# ----------------------------------------------------------------------------------------------------- export
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict of an adapted ``model`` (see `merge_state`)."""
    with full_state(model), torch.no_grad():
        return merge_state(model, {k: v.detach() for k, v in model.state_dict().items()})


def merge_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain model's state dict from ``state``, the adapted ``model``'s every tensor (`full_state`), which may sit
    elsewhere than the model (FSDP gathers it to one rank's CPU while the model stays sharded).

    Each adapted projection's weight becomes ``W + s * B @ A`` (peft's scale ``s``: alpha / r, or alpha / sqrt(r)
    for rsLoRA) and, for DoRA, that times ``m / ||W + s * B @ A||`` per output row, as peft's ``merge_safe``
    computes it; each adapted expert weight becomes its `ExpertLoRA` formula. Sums are taken in fp32 and kept in the
    base's dtype (fp32 adapters on a bf16 base)."""
    state = dict(state)
    with torch.no_grad():
        for name in _adapted_layers(model):
            layer, key = model.get_submodule(name), f"{name}.base_layer.weight"
            base = _dequantized(layer.get_base_layer(), state[key])
            a, b = (state[f"{name}.lora_{x}.{ADAPTER}.weight"].float() for x in ("A", "B"))
            merged = base.float() + (b @ a) * layer.scaling[ADAPTER]
            magnitude = state.get(f"{name}.lora_magnitude_vector.{ADAPTER}.weight")
            if magnitude is not None:
                merged = merged * (magnitude.float() / torch.linalg.vector_norm(merged, dim=1)).unsqueeze(1)
            state[key] = merged.to(base.dtype)
        for name, (_, _, adapter) in expert_adapters(model).items():
            owner, _, leaf = name.rpartition(".")
            prefix = f"{owner}.lora_{leaf}." if owner else f"lora_{leaf}."
            state[name] = adapter.formula(state[name], state[prefix + "lora_A"], state[prefix + "lora_B"],
                                          state.get(prefix + "lora_magnitude"))
    return {k.replace(_BASE_PART, "."): v for k, v in state.items() if not is_adapter_key(k) and not _is_quant_state(k)}


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
