"""Model zoo: the decoder-only transformer, its MoE layer, generation, fused LM loss, Hugging Face interchange."""

from llm.models.decoder import MLP, DecoderModel, RMSNorm, RotaryEmbedding, TransformerBlock
from llm.models.generation import KVCache
from llm.models.hf import load_hf, save_hf
from llm.models.loss import linear_cross_entropy
from llm.models.moe import MoELayer, collect_aux_loss

__all__ = [
    "MLP",
    "DecoderModel",
    "KVCache",
    "MoELayer",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerBlock",
    "collect_aux_loss",
    "linear_cross_entropy",
    "load_hf",
    "save_hf",
]
