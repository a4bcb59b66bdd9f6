"""Model zoo: the decoder-only transformer, its MoE layer, generation, fused LM loss, Hugging Face interchange.

Layering inside: config -> layers -> moe -> flops -> generation -> decoder -> hf; `hooks` is what a trainer calls
on any model (it reaches the MoE layers through their methods). None imports `llm.training`.
"""

from llm.models.config import ModelConfig
from llm.models.decoder import MLP, DecoderModel, RMSNorm, RotaryEmbedding, TransformerBlock
from llm.models.flops import active_parameters, flops_per_token, num_parameters
from llm.models.generation import KVCache
from llm.models.hf import load_hf, save_hf
from llm.models.hooks import aux_loss as collect_aux_loss
from llm.models.loss import linear_cross_entropy
from llm.models.moe import MoELayer

__all__ = [
    "MLP",
    "DecoderModel",
    "KVCache",
    "ModelConfig",
    "MoELayer",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerBlock",
    "active_parameters",
    "collect_aux_loss",
    "flops_per_token",
    "linear_cross_entropy",
    "load_hf",
    "num_parameters",
    "save_hf",
]
