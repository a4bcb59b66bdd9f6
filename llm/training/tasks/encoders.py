"""A bidirectional encoder built from the decoder's `TransformerBlock`s, for non-LM tasks.

The regression and classification tasks use the same blocks as the language model, so
`--model-use-moe` switches their MLPs to MoE layers exactly as it does for the LM. Like `DecoderModel`, it
exposes what the engine reads without knowing the class: `fsdp_units()`, `flops_per_token()`, `num_parameters()`.
"""

from __future__ import annotations

import torch
from torch import nn

from llm.models import flops
from llm.models.config import ModelConfig
from llm.models.decoder import RMSNorm, RotaryEmbedding, TransformerBlock


class SequenceEncoder(nn.Module):
    """[summary token] + input projection -> TransformerBlocks (bidirectional) -> RMSNorm -> head.

    The output is read from a learned summary token prepended to the sequence (BERT's [CLS]): it
    attends to every position, which fits position-dependent targets far faster than mean pooling.
    The blocks are built from ``model_config`` (a ``ModelConfig``); ``vocab_size`` and ``tie_embeddings``
    of it are unused: the input is ``in_features`` floats or ``vocab_size`` token ids, as the task says.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        output_size: int,
        in_features: int | None = None,
        vocab_size: int | None = None,
        num_positions: int = 0,
    ) -> None:
        super().__init__()
        self.config = c = model_config.resolved()
        # Exactly one input kind: float features (projected) or token ids (embedded).
        self.embed: nn.Module = (
            nn.Linear(in_features, c.hidden_size) if in_features else nn.Embedding(vocab_size, c.hidden_size)
        )
        # Absolute positions (e.g. image patches) on top of the blocks' relative rotary positions.
        self.pos_embed = nn.Parameter(torch.randn(num_positions, c.hidden_size) * 0.02) if num_positions else None
        self.summary = nn.Parameter(torch.randn(1, 1, c.hidden_size) * 0.02)
        self.rotary = RotaryEmbedding(c.head_dim, c.max_seq_len, c.rope_theta,
                                      scaling=c if c.rope_type != "default" else None)  # as DecoderModel
        self.layers = nn.ModuleList(TransformerBlock(c, causal=False) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.norm_eps)
        self.head = nn.Linear(c.hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, H)
        if self.pos_embed is not None:
            h = h + self.pos_embed[: h.shape[1]]
        h = torch.cat([self.summary.expand(h.shape[0], -1, -1), h], dim=1)  # (B, 1 + T, H)
        cos, sin = self.rotary(torch.arange(h.shape[1], device=h.device))
        for layer in self.layers:
            h = layer(h, cos, sin)  # (B, T, H)
        return self.head(self.norm(h[:, 0]))  # (B, output_size)

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules FSDP shards one by one: the blocks (the root keeps the input layers, norm and head)."""
        return list(self.layers)

    def num_parameters(self) -> int:
        return flops.num_parameters(self)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per input position at ``seq_len`` (see :func:`llm.models.flops.flops_per_token`)."""
        return flops.flops_per_token(self, seq_len)
