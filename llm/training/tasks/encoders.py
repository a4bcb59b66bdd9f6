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
    """[summary token] + input projection -> TransformerBlocks (bidirectional) -> RMSNorm -> head.

    The output is read from a learned summary token prepended to the sequence (BERT's [CLS]): it
    attends to every position, which fits position-dependent targets far faster than mean pooling.
    """

    def __init__(
        self,
        model_config: Any,
        output_size: int,
        in_features: int | None = None,
        vocab_size: int | None = None,
        num_positions: int = 0,
    ) -> None:
        super().__init__()
        cfg = dataclasses.asdict(model_config)
        hidden, heads = cfg["hidden_size"], cfg["num_heads"]
        # Exactly one input kind: float features (projected) or token ids (embedded).
        self.embed: nn.Module = nn.Linear(in_features, hidden) if in_features else nn.Embedding(vocab_size, hidden)
        # Absolute positions (e.g. image patches) on top of the blocks' relative rotary positions.
        self.pos_embed = nn.Parameter(torch.randn(num_positions, hidden) * 0.02) if num_positions else None
        self.summary = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.rotary = RotaryEmbedding(hidden // heads, cfg["max_seq_len"], cfg["rope_theta"])
        self.layers = nn.ModuleList(TransformerBlock(**cfg, causal=False) for _ in range(cfg["num_layers"]))
        self.norm = RMSNorm(hidden, cfg["norm_eps"])
        self.head = nn.Linear(hidden, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, H)
        if self.pos_embed is not None:
            h = h + self.pos_embed[: h.shape[1]]
        h = torch.cat([self.summary.expand(h.shape[0], -1, -1), h], dim=1)  # (B, 1 + T, H)
        cos, sin = self.rotary(torch.arange(h.shape[1], device=h.device))
        for layer in self.layers:
            h = layer(h, cos, sin)  # (B, T, H)
        return self.head(self.norm(h[:, 0]))  # (B, output_size)
