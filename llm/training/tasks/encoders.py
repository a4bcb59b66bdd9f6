"""A bidirectional encoder built from the decoder's `TransformerBlock`s, for non-LM tasks.

The regression and classification tasks use the same blocks as the language model, so
`--model-use-moe` switches their MLPs to MoE layers exactly as it does for the LM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from llm.models.decoder import RMSNorm, RotaryEmbedding, TransformerBlock


class SequenceEncoder(nn.Module):
    """input projection -> TransformerBlocks (bidirectional) -> RMSNorm -> mean pool -> head."""

    def __init__(self, model_config: Any, output_size: int, in_features: int | None = None, vocab_size: int | None = None):
        super().__init__()
        cfg = dataclasses.asdict(model_config)
        hidden, heads = cfg["hidden_size"], cfg["num_heads"]
        # Exactly one input kind: float features (projected) or token ids (embedded).
        self.embed: nn.Module = nn.Linear(in_features, hidden) if in_features else nn.Embedding(vocab_size, hidden)
        self.rotary = RotaryEmbedding(hidden // heads, cfg["max_seq_len"], cfg["rope_theta"])
        self.layers = nn.ModuleList(TransformerBlock(**cfg, causal=False) for _ in range(cfg["num_layers"]))
        self.norm = RMSNorm(hidden, cfg["norm_eps"])
        self.head = nn.Linear(hidden, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, H)
        cos, sin = self.rotary(torch.arange(h.shape[1], device=h.device))
        for layer in self.layers:
            h = layer(h, cos, sin)  # (B, T, H)
        return self.head(self.norm(h).mean(dim=1))  # (B, output_size)
