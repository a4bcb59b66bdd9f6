"""The `lm` task: next-token prediction with `DecoderModel` (dense or MoE) on token-cached text.

Batches are `(input_ids, targets)` from `TextDataModule`. The loss is mean cross-entropy per token; the logs
add bits per byte (`bpb`: loss / ln 2 * tokens per byte of the split, so tokenizers compare fairly; the
byte tokenizer's ratio is 1) and validation perplexity, both derived from the reduced mean loss
(`reduce_metrics`): every window has `seq_len` tokens, so the engine's sample-weighted mean is the token-weighted
mean, and perplexity is exp of it. The MoE auxiliary loss is added by the engine, not here. With
`data.document_mask` the model gets each window's document ids (`window_document_ids`: a separator ends its
document), so no token attends across a document boundary while windows still cross them.

`model.vocab_size` follows the tokenizer unless the user set it: a value other than the dataclass default (or,
with `model.preset`, the preset's vocabulary, which the preset's own tokenizer reproduces) must be at least the
tokenizer's vocabulary (larger pads the embedding, e.g. to a multiple of 64); smaller is a "tokenizer/vocab
mismatch" `ConfigError`. The size is resolved once, with the config (`resolved_values`, before the run
directory's `config.yaml` is saved), so a run's config rebuilds its model. `model.max_seq_len` is raised to
`data.seq_len` unless the user set it (`derived_defaults`, applied by the train CLI).

`TextSampler` (callback) generates from a few prompts at every validation on rank 0 and publishes them through the
engine's metrics channel (console, TensorBoard text, `metrics.jsonl`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from llm.data.shards import is_prepared
from llm.data.text import SAMPLING_MODES, TextDataModule, bits_per_byte, window_document_ids
from llm.data.tokenizers import TOKENIZER_FILE, resolve_vocab_size
from llm.errors import ConfigError, invalid
from llm.models.decoder import DecoderModel
from llm.models.presets import get_preset
from llm.registry import register_callback, register_task
from llm.training.core.callbacks import Callback
from llm.training.core.config import ModelConfig
from llm.training.parallel.tensor import plain
from llm.training.tasks.base_task import TrainingTask

_DEFAULT_VOCAB = ModelConfig.vocab_size


def vocab_to_follow(model: ModelConfig) -> int:
    """The vocab_size that means "follow the tokenizer": the default, or the preset's own (made for its tokenizer)."""
    return get_preset(model.preset).fields.get("vocab_size", _DEFAULT_VOCAB) if model.preset else _DEFAULT_VOCAB


def cover_seq_len(config: Any) -> int:
    """raised to data.seq_len"""  # the reason the CLI's preset note gives; the context covers the training window
    return max(config.model.max_seq_len, config.data.seq_len)


def resolve_model_vocab(requested: int, tokenizer_vocab: int, follow: int = _DEFAULT_VOCAB) -> int:
    """The model's vocabulary: the tokenizer's unless the user set a (large enough) size of their own.

    ``follow`` is the value that is not the user's choice: the dataclass default, or a preset's vocabulary (kept
    only where the tokenizer has that many ids, i.e. the preset's own tokenizer)."""
    if requested == follow:
        return tokenizer_vocab
    if requested < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size: tokenizer/vocab mismatch: {requested} is smaller than the tokenizer's "
            f"{tokenizer_vocab} ids; drop --model-vocab-size to follow the tokenizer, or set it >= {tokenizer_vocab}"
        )
    return requested


# Sequence-length warmup (`training.seq_len_warmup`, issue 24): at most this many halvings of the window.
MAX_HALVINGS = 3


def rows_per_window(step: int, warmup: int, seq_len: int) -> int:
    """Into how many rows each training window of ``seq_len`` tokens is cut at optimizer step ``step`` (0-based):
    the warmup's first third of steps 8 (T/8 tokens a row), then 4, then 2, then 1 from step ``warmup`` on (fewer
    halvings where ``seq_len`` has fewer factors of 2). A pure function of the step: the same rows on resume and on
    every rank, and every token of the batch is still scored (only the context before it is shorter)."""
    if step >= warmup:
        return 1
    halvings = 0
    while halvings < MAX_HALVINGS and seq_len % (2 ** (halvings + 1)) == 0:
        halvings += 1
    return 2 ** (halvings - step * halvings // warmup)


def split_rows(batch: tuple[torch.Tensor, torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) windows and targets as (B * rows, T / rows): each window's tokens in ``rows`` consecutive rows."""
    input_ids, targets = batch
    b, t = input_ids.shape
    return input_ids.reshape(b * rows, t // rows), targets.reshape(b * rows, t // rows)


@register_task("lm")
class LMTask(TrainingTask):
    """Causal language modelling; `make train` runs it with these defaults on the embedded corpus."""

    # Chosen by measurement on the 2-core CPU `make train` runs on (the numbers are in benchmarks/RESULTS.md):
    # the learning rate, the unrounded SwiGLU width 8/3 x hidden (344 at 128: the width rounds to a multiple of 8,
    # not Llama's 256, so a wider model keeps the rule, not the number) and a step count that leaves room for the
    # two full validations (half-way and final), sampling and start-up within the 8-minute budget. Muon (hidden
    # matrices; AdamW for the rest, training.muon_lr_scale 8) reaches a lower val bpb in 1000 steps (1.564) than
    # AdamW in 1500 (1.698), for 8-12% more time per step, so the run is shorter and better (issue 15). The schedule
    # is warmup, stable, then a 1-sqrt decay over the last 20% (WSD): 0.050 bits per byte below warmup + cosine at the
    # 400-step ablation budget, at the same cost per step; the embedding table trains with Muon too (no weight decay),
    # a further 0.037 below it on AdamW (with WSD) at that budget (issue 24, "Main-job levers", benchmarks/RESULTS.md).
    # Muon's momentum 0.9 (torch's default 0.95): a further 0.046 below at the same budget and cost per step (issue 24,
    # "Ablations on the new default").
    config_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        # Two heads of 64: a cheaper step than four of 32, the same bpb after the decay; the attention kernel in fp32
        # on a CPU: a little faster at this width (issue 24's third sweep, benchmarks/RESULTS.md).
        "model": {"hidden_size": 128, "num_layers": 4, "num_heads": 2, "intermediate_multiple_of": 8,
                  "max_seq_len": 256, "attention_fp32_on_cpu": True},
        "data": {"seq_len": 256},
        "training": {
            "optimizer": "muon", "lr": 1e-3, "batch_size": 16, "max_steps": 1100, "warmup": 100, "min_lr_ratio": 0.1,
            "scheduler_type": "wsd", "decay_fraction": 0.2, "decay_shape": "sqrt", "muon_embeddings": True,
            "muon_momentum": 0.9,
            "weight_decay": 0.1, "val_interval": 550, "val_max_batches": 0, "log_interval": 20,
            "callbacks": ["+TextSampler"],  # appended to the framework's default callbacks
        },
    }
    # Fields derived from others unless the user set them (YAML or flag); the train CLI applies them.
    derived_defaults: ClassVar[dict[str, Callable[[Any], Any]]] = {"model.max_seq_len": cover_seq_len}
    data_module_class = TextDataModule
    #: Whether `data.packing` means something to this task (sft packs its examples; lm windows are full rows).
    packs_examples: ClassVar[bool] = False
    splits_windows: ClassVar[bool] = True  # its train step honours training.seq_len_warmup (validate_config)

    @classmethod
    def resolved_values(cls, config: Any) -> dict[str, Any]:
        """The tokenizer of a prepared directory and the model's vocabulary, decided once, before the run's
        config.yaml is written, so that the saved config rebuilds the model."""
        d, m = config.data, config.model
        values: dict[str, Any] = {}
        tokenizer = d.tokenizer
        prepared_tokenizer = os.path.join(d.path, TOKENIZER_FILE) if d.path else ""
        if tokenizer in ("byte", "bpe") and is_prepared(d.path) and os.path.isfile(prepared_tokenizer):
            # A directory prepared with a tokenizer.json (python -m llm.data.prepare) holds that tokenizer's ids:
            # the run takes it, as it would have to be told anyway.
            tokenizer = values["data.tokenizer"] = prepared_tokenizer
        if tokenizer == "bpe" and d.path.endswith(".bin"):
            raise ConfigError(
                f"data.tokenizer: 'bpe' trains on text but data.path {d.path!r} is pre-tokenized; "
                "use 'byte' or the tokenizer.json the .bin was made with"
            )
        tokenizer_vocab = resolve_vocab_size(tokenizer, d.vocab_size)
        values["model.vocab_size"] = resolve_model_vocab(m.vocab_size, tokenizer_vocab, vocab_to_follow(m))
        return values

    @classmethod
    def validate_config(cls, config: Any) -> None:
        d, m = config.data, config.model
        if d.sampling not in SAMPLING_MODES:
            raise invalid("data.sampling", d.sampling, "random or sequential", SAMPLING_MODES)
        if d.seq_len > m.max_seq_len:
            raise invalid("data.seq_len", d.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
        if d.packing and not cls.packs_examples:
            raise invalid("data.packing", True, f"the {config.task} task's data is not packed (lm windows are full "
                          "rows already; --data-document-mask keeps them from attending across documents)")
        if config.training.seq_len_warmup:
            if cls.train_step is not LMTask.train_step:  # e.g. sft: rows of a chat, with their own masks
                raise invalid("training.seq_len_warmup", config.training.seq_len_warmup,
                              f"0: the task {config.task!r} has its own train step, which does not split windows")
            if d.seq_len % 2:
                raise invalid("training.seq_len_warmup", config.training.seq_len_warmup,
                              f"0: data.seq_len={d.seq_len} is odd and cannot be halved")

    def build_data_module(self) -> Any:
        self.data_module = super().build_data_module()
        return self.data_module

    # -- builders -------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        # model.vocab_size was resolved with the config (`resolved_values`); a BPE tokenizer trained short of
        # data.vocab_size on a small corpus leaves spare embedding rows, which are harmless.
        return DecoderModel(**dataclasses.asdict(self.config.model))

    def build_criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    # -- steps ----------------------------------------------------------------------------------
    def _tokens_per_byte(self, split: str) -> float:
        return float(getattr(getattr(self, "data_module", None), f"{split}_tokens_per_byte", 1.0))

    def _loss(self, batch: Any, model: nn.Module, criterion: nn.Module) -> torch.Tensor:
        input_ids, targets = batch
        separator = getattr(getattr(self, "data_module", None), "document_separator", None)
        if separator is None:
            logits = model(input_ids)  # (B, T, V)
        else:  # data.document_mask: attention stays inside each document of the window
            logits = model(input_ids, document_ids=window_document_ids(input_ids, separator))  # (B, T, V)
        # fp32 logits for the softmax: under bf16 autocast a 4k-way log-softmax loses precision. Under sequence
        # parallelism the logits are split along the vocabulary and the loss is the group's replicated DTensor.
        return plain(criterion(logits.flatten(0, 1).float(), targets.flatten()))

    def train_step(self, batch: Any, model: nn.Module, criterion: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
        warmup = self.config.training.seq_len_warmup
        if warmup and self.context is not None and self.context.step < warmup:
            batch = split_rows(batch, rows_per_window(self.context.step, warmup, batch[0].shape[1]))
        return self._loss(batch, model, criterion), {}

    def validation_step(
        self, batch: Any, model: nn.Module, criterion: nn.Module
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._loss(batch, model, criterion), {}

    def reduce_metrics(self, metrics: dict[str, float], split: str) -> dict[str, float]:
        if "loss" not in metrics:
            return metrics
        derived = {"bpb": bits_per_byte(metrics["loss"], self._tokens_per_byte(split))}
        if split == "val":
            derived["ppl"] = math.exp(min(metrics["loss"], 700.0))  # exp of the mean loss; capped before overflow
        return {**metrics, **derived}


# -------------------------------------------------------------------------------------------------------- sampler
PYTHON_PROMPTS = ("def ", "class Tree:\n    def __init__(self", "import os\n")


@register_callback("TextSampler")
class TextSampler(Callback):
    """Generates from a few prompts after each validation (rank 0): console, TensorBoard text, metrics.jsonl.

    Prompts default to Python openings on the embedded stdlib corpus, and to the first tokens of validation
    windows on a user corpus (so they are always in-distribution). Sampling is seeded: a sample changes only
    because the weights did.
    """

    def __init__(
        self, prompts: tuple[str, ...] | None = PYTHON_PROMPTS, max_new_tokens: int = 160, temperature: float = 0.8,
        top_k: int | None = 40, seed: int = 0,
    ) -> None:
        self.prompts, self.max_new_tokens, self.temperature = prompts, max_new_tokens, temperature
        self.top_k, self.seed = top_k, seed
        self.last: list[dict[str, str]] = []
        self._last_step = -1

    @classmethod
    def from_config(cls, config: Any) -> TextSampler:
        return cls(prompts=PYTHON_PROMPTS if not config.data.path else None, seed=config.seed)

    def _prompt_ids(self) -> list[list[int]]:
        dm = self.engine.data_module
        if self.prompts is not None:
            return [dm.tokenizer.encode(p) for p in self.prompts]
        val, n = dm.val_set, len(dm.val_set)
        return [val[i][0][:16].tolist() for i in sorted({0, n // 2, n - 1})]

    def sample(self) -> list[dict[str, str]]:
        """One generation per prompt from the current weights."""
        dm, model = self.engine.data_module, self.engine.model
        tokenizer = dm.tokenizer
        stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else None
        samples = []
        for i, ids in enumerate(self._prompt_ids()):
            prompt = torch.tensor(ids, dtype=torch.long)
            out = model.generate(
                prompt, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, stop_tokens=stops,
                seed=self.seed + i, vocab_limit=tokenizer.vocab_size,  # a padded vocabulary's extra ids are no text
            )
            new = out[len(ids) :].tolist()
            if stops and new and new[-1] == stops[0]:
                new = new[:-1]
            samples.append({"prompt": tokenizer.decode(ids), "text": tokenizer.decode(ids + new)})
        return samples

    def _publish(self, step: int) -> None:
        self.last = self.sample()
        self.engine.log({"samples": self.last}, step)

    def _sharded(self) -> bool:
        # An FSDP model's forward gathers weights from every rank, and an expert-parallel one exchanges tokens with
        # every rank of its group, so every rank must generate (same seed, same tokens); a DDP model's unwrapped
        # module is whole on rank 0, which generates alone.
        return self.engine.forward_is_collective

    def _maybe_publish(self, step: int) -> None:
        self._last_step = step
        if self.engine.is_global_zero:
            self._publish(step)
        elif self._sharded():
            self.sample()

    def on_validation_end(self, logs: dict[str, Any] | None = None) -> None:
        self._maybe_publish(int((logs or {}).get("step", self.engine.state.step)))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        # The run normally ends with a validation (and so with samples); sample if it did not.
        if self._last_step != self.engine.state.step:
            self._maybe_publish(self.engine.state.step)

