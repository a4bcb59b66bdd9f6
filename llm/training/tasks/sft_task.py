"""The `sft` task: supervised fine-tuning of a `DecoderModel` on instruction records, loss on the answers only.

Data, template and labels are `llm.data.sft`'s (`SFTDataModule`): batches are `(input_ids, labels)`, right-padded,
labels `IGNORE_INDEX` everywhere but the assistant answers and their end-of-sequence token. Without `data.path` the
task trains on the generated demo set, so `python -m llm.training.train --task sft` runs out of the box.

With `data.packing` batches are `(input_ids, labels, document_ids)`: several examples per row, each attending only
to itself (`DecoderModel(..., document_ids=...)`); the loss is computed exactly as unpacked.

The training loss is the mean cross-entropy over a micro-batch's answer tokens (packed or not: every answer token
of the micro-batch weighs the same), over all ranks' micro-batches together: N processes train as one process
with their global batch (the engine averages micro-batches as for any task).
Validation reports, over all answer tokens of the split (token-weighted, exact across batches and ranks):
`val/loss`, `val/accuracy` (the share of answer tokens that greedy next-token prediction gets right) and `val/ppl`.
A batch's sums reach `reduce_metrics` as per-sample (per-row) means (the engine weights validation batches by their
size), and the ratio of two such means is the ratio of the sums, so packed and unpacked validation agree.

Everything else is the `lm` task's: the model follows the tokenizer's vocabulary, `model.max_seq_len` covers
`data.seq_len`, and `--training-lora-rank R` fine-tunes LoRA adapters instead of every weight (`adapt_model` of
the base task); `--model-init-from` starts from pretrained weights.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from llm.data.sft import IGNORE_INDEX, SFTDataModule
from llm.errors import ConfigError, invalid
from llm.registry import register_task
from llm.training.parallel.tensor import plain
from llm.training.tasks.lm_task import LMTask

# Sums of a validation batch, divided by its size (see the module docstring); `reduce_metrics` turns them into ratios.
_NLL, _TOKENS, _CORRECT = "answer_nll", "answer_tokens", "answer_correct"


@register_task("sft")
class SFTTask(LMTask):
    """Instruction tuning; the defaults train the demo set on a 2-core CPU in a few minutes."""

    # The lm task's model and about its tokens per step (32 x 160 vs 16 x 256); 160 tokens hold the longest demo
    # conversation in bytes. An 80-step run of a smaller model (hidden 64, 2 layers) already took the response
    # loss from 5.5 to 2.6 nats; the full default run was not timed on the 2-core machine.
    config_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_multiple_of": 8,
                  "max_seq_len": 160},
        "data": {"seq_len": 160},
        "training": {
            "lr": 1e-3, "batch_size": 32, "max_steps": 600, "warmup": 50, "min_lr_ratio": 0.1,
            "weight_decay": 0.1, "val_interval": 200, "val_max_batches": 0, "log_interval": 20,
        },
    }
    data_module_class = SFTDataModule

    @classmethod
    def validate_config(cls, config: Any) -> None:
        if config.data.tokenizer == "bpe":
            raise ConfigError("data.tokenizer: sft does not train a BPE tokenizer; use 'byte' or a tokenizer.json")
        if config.data.document_mask:
            raise invalid("data.document_mask", True, "it applies to the lm task's windows; sft examples are masked "
                          "from each other with --data-packing")
        super().validate_config(config)

    def build_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    packs_examples: ClassVar[bool] = True  # `data.packing` is this task's (see LMTask.validate_config)

    def _logits(self, batch: Any, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = batch[0], batch[1]
        # packed rows carry their examples' document ids; fp32 logits for the softmax, as in the lm task
        logits = model(input_ids) if len(batch) == 2 else model(input_ids, document_ids=batch[2])  # (B, T, V)
        return logits.flatten(0, 1).float(), labels.flatten()  # (B*T, V), (B*T,)

    def _loss(self, batch: Any, model: nn.Module, criterion: nn.Module) -> torch.Tensor:
        logits, labels = self._logits(batch, model)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return criterion(logits, labels)
        # Several processes: every answer token of the global micro-batch weighs the same, as in one process. Each
        # rank's mean would weigh a rank's tokens by 1 / its own count (ranks hold different numbers of answer
        # tokens, packed or not); instead each rank divides its sum by the global count, times the world size that
        # the gradient average divides by again. A tensor-parallel group counts its shared batch T times and is T
        # times in the world size, so the two cancel. One scalar all-reduce per micro-batch, on the device.
        # (vocabulary-split logits under sequence parallelism: `plain` makes the loss the rank's plain tensor)
        nll = plain(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
        count = (labels != IGNORE_INDEX).sum().to(nll.dtype)
        dist.all_reduce(count)
        return nll * dist.get_world_size() / count

    def validation_step(
        self, batch: Any, model: nn.Module, criterion: nn.Module
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        logits, labels = self._logits(batch, model)
        answer = labels != IGNORE_INDEX  # (B*T,)
        tokens = answer.sum()
        nll = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((logits.argmax(-1) == labels) & answer).sum()
        size = batch[0].shape[0]
        return nll / tokens, {_NLL: nll / size, _TOKENS: tokens / size, _CORRECT: correct / size}

    def reduce_metrics(self, metrics: dict[str, float], split: str) -> dict[str, float]:
        metrics = dict(metrics)
        if _TOKENS in metrics:
            tokens = metrics.pop(_TOKENS)
            metrics["loss"] = metrics.pop(_NLL) / tokens
            metrics["accuracy"] = metrics.pop(_CORRECT) / tokens
        if split == "val" and "loss" in metrics:
            metrics["ppl"] = math.exp(min(metrics["loss"], 700.0))  # exp of the token-weighted mean; capped
        return metrics
