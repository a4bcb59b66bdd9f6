"""Hugging Face interchange: load/save ``LlamaForCausalLM`` and ``MixtralForCausalLM`` directories.

Reads and writes the ``save_pretrained`` layout (``config.json`` + ``model.safetensors`` or sharded
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``) using only ``safetensors`` and
``json``: transformers is never imported. Since DecoderModel uses HF Llama's module names, dense weights are a
prefix strip; MoE experts are stacked here and per-expert in HF's files.

Mixtral experts on disk, as transformers 5.24 writes them (and 4.x did): per expert
``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` (gate, (I, H)), ``w3`` (up, (I, H)), ``w2`` (down,
(H, I)) and the router ``block_sparse_moe.gate.weight``. transformers 5 holds them fused in memory
(``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj`` (E, H, I), ``mlp.gate.weight``); files with
those names (e.g. a raw ``state_dict`` dump) are accepted too. ``save_hf`` writes the per-expert form.

HF's router aux-loss coefficient is not carried over: its loss is normalized differently (times top_k, averaged
over layers), so the loaded model keeps DecoderModel's own ``moe_aux_loss_coef``/``moe_z_loss_coef`` defaults.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from llm.models.decoder import DecoderModel

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$")


# ---------------------------------------------------------------------------------------------------- config
def _config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """DecoderModel keyword arguments from an HF Llama/Mixtral ``config.json`` dict; raises on what we lack."""
    arch = (hf.get("architectures") or [None])[0]
    model_type = hf.get("model_type")
    if arch not in ("LlamaForCausalLM", "MixtralForCausalLM") and model_type not in ("llama", "mixtral"):
        raise ValueError(f"unsupported architecture {arch or model_type!r}: expected LlamaForCausalLM or Mixtral")
    is_moe = arch == "MixtralForCausalLM" or model_type == "mixtral"
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"unsupported rope scaling {rope}: only the default rotary embedding is implemented")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: the MLP is SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("unsupported: attention/MLP biases")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim not in (None, hf["hidden_size"] // num_heads):
        raise ValueError(f"unsupported head_dim {head_dim} != hidden_size / num_attention_heads")
    if hf.get("sliding_window"):
        raise ValueError(f"unsupported sliding_window {hf['sliding_window']}")
    cfg: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if is_moe:
        cfg.update(use_moe=True, num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                   moe_intermediate_size=hf["intermediate_size"])
    return cfg


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
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    hf: dict[str, Any] = dict(
        architectures=["MixtralForCausalLM" if c.use_moe else "LlamaForCausalLM"],
        model_type="mixtral" if c.use_moe else "llama",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.moe_intermediate_size if c.use_moe else c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.hidden_size // c.num_heads,
        hidden_act="silu",
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        # v5 reads rope_parameters, v4 reads rope_theta; writing both loads in either
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings,
        attention_dropout=0.0,
        dtype=dtype,
        torch_dtype=dtype,
        use_cache=True,
    )
    if c.use_moe:
        hf.update(num_local_experts=c.num_experts, num_experts_per_tok=c.top_k, sliding_window=None,
                  router_jitter_noise=0.0, output_router_logits=False)
    else:
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return hf


# ---------------------------------------------------------------------------------------------------- tensors
def _read_safetensors(path: Path) -> dict[str, Tensor]:
    index = path / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / SINGLE_NAME).exists():
        files = [SINGLE_NAME]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
    tensors: dict[str, Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not iterable
                tensors[key] = f.get_tensor(key)
    return tensors


def _state_dict_from_hf(hf: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """HF tensor names/layouts -> DecoderModel state_dict."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[int, int], dict[str, Tensor]] = {}
    for key, t in hf.items():
        if m := _EXPERT.match(key):
            experts.setdefault((int(m[1]), int(m[2])), {})[m[3]] = t
        elif m := _FUSED.match(key):
            name = "w_gate_up" if m[2] == "gate_up_proj" else "w_down"
            out[f"layers.{m[1]}.mlp.{name}"] = t.transpose(1, 2).contiguous()  # (E, H, 2I) / (E, I, H)
        elif m := _ROUTER.match(key):
            out[f"layers.{m[1]}.mlp.gate.weight"] = t
        elif key.startswith("model."):
            out[key.removeprefix("model.")] = t
        elif key == "lm_head.weight":
            out[key] = t
        else:
            raise KeyError(f"unexpected tensor {key!r} in Hugging Face checkpoint")
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
    for key, t in model.state_dict().items():
        t = t.detach()
        if key == "lm_head.weight":
            if not model.config.tie_embeddings:
                out[key] = t
        elif key.endswith("routing_bias"):
            continue  # all zero (checked by _config_to_hf): routing is the router's alone, as in Mixtral
        elif m := re.match(r"^layers\.(\d+)\.mlp\.gate\.weight$", key):
            out[f"model.layers.{m[1]}.block_sparse_moe.gate.weight"] = t
        elif m := re.match(r"^layers\.(\d+)\.mlp\.(w_gate_up|w_down)$", key):
            prefix = f"model.layers.{m[1]}.block_sparse_moe.experts"
            for e, w in enumerate(t):
                if m[2] == "w_gate_up":  # (H, 2I)
                    out[f"{prefix}.{e}.w1.weight"] = w[:, :inter].T.clone()
                    out[f"{prefix}.{e}.w3.weight"] = w[:, inter:].T.clone()
                else:  # (I, H)
                    out[f"{prefix}.{e}.w2.weight"] = w.T.clone()
        else:
            out[f"model.{key}"] = t
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------- API
def load_hf(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> DecoderModel:
    """DecoderModel from a ``save_pretrained`` Llama/Mixtral directory. ``dtype`` None keeps the file's dtype."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'} not found")
    cfg = _config_from_hf(json.loads((path / "config.json").read_text()))
    state = _state_dict_from_hf(_read_safetensors(path), cfg)
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
