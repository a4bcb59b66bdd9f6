"""The `dpo` task: preference tuning of a `DecoderModel` on (prompt, chosen, rejected) pairs.

Data is `llm.data.preference`'s: batches `(input_ids, labels[, ref_logps])`, both sides of each pair rendered as
the `sft` task renders a chat and right-padded together, labels on the completion only. Without `data.path` the
task trains on the generated arithmetic demo, so `python -m llm.training.train --task dpo` runs out of the box.

A step runs the policy once over the 2B rows (chosen rows, then rejected rows: one forward, as DDP wants it) and
sums each row's completion log-probs (fp32 log-softmax; prompt and padding masked). The loss is the registered
`training.preference_loss` (`preference_losses`: dpo, ipo, simpo, orpo), with `training.dpo_beta`,
`training.dpo_label_smoothing` and `training.simpo_gamma`.

The reference model (dpo, ipo) is the policy's starting weights, fixed when the criterion is built: after
`model.init_from` has loaded and DDP has given every rank rank 0's weights, before any checkpoint is resumed, so a
resumed run has the reference of the run it continues. It is a frozen copy (eval mode, no gradients, the policy's
dtype) or, under LoRA, the policy itself with its adapters switched off through peft's `enable_adapters` (no second
copy in memory). With `training.dpo_precompute_ref` the reference's log-probs of every pair are computed once, at
the same point, attached to the data sets (`PreferencePairs.set_reference`) and carried in the batches; no
reference is kept. simpo and orpo need none. Under tensor parallelism the criterion is built after the plan has
split the policy, so the frozen copy is split the same way (each rank holds 1/T of its attention and MLP matrices) and
its forward runs the same collectives as the policy's; tested to equal one process (tests/training/parallel/
test_tensor_parallel.py). The dpo task runs on ddp, not fsdp (refused by `validate_config`).

Metrics (train and `val/`, means over pairs, reduced with the engine's one sync per log): `rewards/chosen`,
`rewards/rejected`, `rewards/margin`, `rewards/accuracy` (the share of pairs whose chosen reward is the higher),
`logps/chosen`, `logps/rejected` (summed completion log-probs), and the loss's own (orpo: `nll`, `log_odds_ratio`).
Everything else (tokenizer, vocabulary, model, LoRA, `--model-init-from`) is the `sft` task's.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llm.data.preference import PairCollate, PreferenceDataModule, PreferencePairs
from llm.data.sft import IGNORE_INDEX, SpecialTokens
from llm.errors import ConfigError, invalid
from llm.models.lora import is_adapted
from llm.registry import register_task
from llm.training.optim.precision import autocast
from llm.training.tasks.preference_losses import LossSpec, PairLogps, PreferenceParams, get_preference_loss
from llm.training.tasks.sft_task import SFTTask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-prob of the labelled tokens (fp32) and how many there are. logits (N, T, V), labels
    (N, T) already shifted (label t is the token after input t), `IGNORE_INDEX` where not counted."""
    token = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")  # (N*T,), 0 where ignored
    return token.view(labels.shape).sum(-1), (labels != IGNORE_INDEX).sum(-1)


def pair_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) -> (2B, ...): every chosen row, then every rejected row."""
    return x.transpose(0, 1).flatten(0, 1)


# ---------------------------------------------------------------------------------------------- reference
class Reference:
    """Reference log-probs of (2B, T) rows from the policy's starting weights."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @contextlib.contextmanager
    def weights(self) -> Iterator[nn.Module]:
        """The starting weights as a module in eval mode (the caller runs it under no_grad)."""
        yield self.model

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.weights() as model:
            return sequence_logps(model(input_ids), labels)[0]


class FrozenCopy(Reference):
    """A copy of the policy as it starts: eval mode, no gradients, the policy's dtype and device."""

    def __init__(self, model: nn.Module) -> None:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        for module in frozen.modules():  # nothing to recompute without a backward
            if hasattr(module, "activation_checkpointing"):
                module.activation_checkpointing = False
        super().__init__(frozen)


class AdaptersOff(Reference):
    """The LoRA policy itself with its adapters switched off (peft's `enable_adapters`): the base it started from,
    with no second copy. Also in eval mode for the forward; the policy's mode and adapters are restored after."""

    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        super().__init__(model)
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def weights(self) -> Iterator[nn.Module]:
        was_training = self.model.training
        self.model.eval()
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            yield self.model
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)
            self.model.train(was_training)


class _EvalMode(Reference):
    """The policy itself in eval mode: its starting weights while no step has run (precomputing)."""

    @contextlib.contextmanager
    def weights(self) -> Iterator[nn.Module]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield self.model
        finally:
            self.model.train(was_training)


def starting_reference(model: nn.Module, copy_weights: bool = True) -> Reference:
    """The reference of a policy at its starting weights: adapters off under LoRA; else a frozen copy (or, with
    ``copy_weights=False``, for a use before the first step, the policy itself in eval mode)."""
    if is_adapted(model):
        return AdaptersOff(model)
    if copy_weights:
        return FrozenCopy(model)
    return _EvalMode(model)


class PreferenceCriterion:
    """The dpo task's criterion: the loss, its hyper-parameters, and the reference (None: the loss needs none, or
    the batches carry precomputed log-probs)."""

    def __init__(self, spec: LossSpec, params: PreferenceParams, reference: Reference | None) -> None:
        self.spec, self.params, self.reference = spec, params, reference


# --------------------------------------------------------------------------------------------------- task
@register_task("dpo")
class DPOTask(SFTTask):
    """Preference tuning; the defaults take the demo's val/rewards/accuracy near 1 in about a minute on a CPU."""

    # A small model for a small demo (35-token sides), trained from scratch. fp32: on the 2-core CPU, bf16 autocast
    # made this model's steps about 10x slower. 40 steps take the demo's val/rewards/accuracy to 1.0 (README,
    # "Preference tuning (DPO)"); the lr is a from-scratch toy's, not a fine-tuning one (pass --training-lr).
    config_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_multiple_of": 8,
                  "max_seq_len": 64},
        "data": {"seq_len": 64, "num_samples": 800, "val_fraction": 0.1},
        "training": {
            "lr": 1e-2, "batch_size": 16, "max_steps": 40, "warmup": 5, "min_lr_ratio": 0.1, "precision": "fp32",
            "val_interval": 20, "val_max_batches": 0, "log_interval": 10,
        },
    }
    data_module_class = PreferenceDataModule

    @classmethod
    def validate_config(cls, config: Any) -> None:
        super().validate_config(config)
        t = config.training
        spec = get_preference_loss(t.preference_loss)
        if not (math.isfinite(t.dpo_beta) and t.dpo_beta > 0):
            raise invalid("training.dpo_beta", t.dpo_beta, "must be > 0")
        if not 0.0 <= t.dpo_label_smoothing < 0.5:
            raise invalid("training.dpo_label_smoothing", t.dpo_label_smoothing, "must be in [0, 0.5)")
        if t.dpo_label_smoothing and not spec.label_smoothing:
            raise invalid("training.dpo_label_smoothing", t.dpo_label_smoothing,
                          f"the {t.preference_loss} loss defines no label smoothing (dpo and simpo do); use 0")
        if t.simpo_gamma < 0:
            raise invalid("training.simpo_gamma", t.simpo_gamma, "must be >= 0")
        if t.dpo_precompute_ref and not spec.needs_reference:
            raise invalid("training.dpo_precompute_ref", True,
                          f"the {t.preference_loss} loss uses no reference model; drop the flag")
        if config.distributed.strategy != "ddp":
            raise invalid("distributed.strategy", config.distributed.strategy, "the dpo task runs on ddp")

    # -- builders -------------------------------------------------------------------------------
    def adapt_model(self, model: nn.Module) -> nn.Module:
        # The policy as the engine will hold it unwrapped: `model.init_from` loads into this very module.
        self.policy = super().adapt_model(model)
        return self.policy

    def build_criterion(self) -> PreferenceCriterion:  # type: ignore[override]
        """Called by the engine once the policy holds its starting weights (after `model.init_from` and the DDP
        broadcast, before a resume): the reference is fixed here."""
        t = self.config.training
        spec = get_preference_loss(t.preference_loss)
        params = PreferenceParams(t.dpo_beta, t.dpo_label_smoothing, t.simpo_gamma)
        policy = getattr(self, "policy", None)
        if not spec.needs_reference:
            return PreferenceCriterion(spec, params, None)
        if policy is None:
            raise ConfigError("task: the dpo task's reference is built from its model; call build_model and "
                              "adapt_model before build_criterion")
        if t.dpo_precompute_ref:
            self.precompute_reference(starting_reference(policy, copy_weights=False))
            return PreferenceCriterion(spec, params, None)
        return PreferenceCriterion(spec, params, starting_reference(policy))

    def precompute_reference(self, reference: Reference) -> None:
        """Attach the reference's log-probs of every pair to the training and validation sets (each rank computes
        them all: the same weights give every rank the same numbers)."""
        dm = self.data_module
        collate = PairCollate(SpecialTokens.of(dm.tokenizer).eos)
        device = next(reference.model.parameters()).device
        for dataset in (dm.train_set, dm.val_set):
            assert isinstance(dataset, PreferencePairs)
            dataset.reference = None
            out = []
            for start in range(0, len(dataset), dm.batch_size):
                input_ids, labels = collate([dataset[i] for i in range(start, min(start + dm.batch_size,
                                                                                   len(dataset)))])
                with autocast(self.config.training.precision, device):
                    logps = reference(pair_rows(input_ids.to(device)), pair_rows(labels.to(device)))
                out.append(logps.view(2, -1).t().cpu())  # (b, 2): chosen, rejected
            dataset.set_reference(torch.cat(out).numpy().astype(np.float32))

    # -- steps ----------------------------------------------------------------------------------
    def pair_logps(self, batch: Any, model: nn.Module, criterion: PreferenceCriterion) -> PairLogps:
        """The policy's (and the reference's) completion log-probs of a batch."""
        input_ids, labels = pair_rows(batch[0]), pair_rows(batch[1])  # (2B, T)
        ref_chosen = ref_rejected = None
        if len(batch) > 2:  # precomputed
            ref_chosen, ref_rejected = batch[2][:, 0].float(), batch[2][:, 1].float()
        elif criterion.reference is not None:
            # Before the policy's forward: under LoRA it is the same module, whose last forward is the one the
            # engine reads (MoE auxiliary losses).
            ref_chosen, ref_rejected = criterion.reference(input_ids, labels).chunk(2)
        logps, tokens = sequence_logps(model(input_ids), labels)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.to(logps.dtype).chunk(2)
        return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected)

    def train_step(  # type: ignore[override]
        self, batch: Any, model: nn.Module, criterion: PreferenceCriterion
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        logps = self.pair_logps(batch, model, criterion)
        out = criterion.spec.fn(logps, criterion.params)
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        metrics = {
            "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margin": (chosen - rejected).mean(), "rewards/accuracy": (chosen > rejected).float().mean(),
            "logps/chosen": logps.chosen.detach().mean(), "logps/rejected": logps.rejected.detach().mean(),
            **out.extra,
        }
        return out.loss, metrics

    def validation_step(  # type: ignore[override]
        self, batch: Any, model: nn.Module, criterion: PreferenceCriterion
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.train_step(batch, model, criterion)

    def reduce_metrics(self, metrics: dict[str, float], split: str) -> dict[str, float]:
        return metrics  # every metric is a mean over pairs already; sft's token ratios and perplexity do not apply
