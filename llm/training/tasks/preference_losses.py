"""Preference losses of the `dpo` task: a registry of functions from a batch's sequence log-probs to a loss.

Every loss sees the same inputs (`PairLogps`): per pair, the policy's log-probability of the chosen and of the
rejected completion, summed over the completion's tokens (the prompt is masked), the token counts of both, and,
for the losses that need one (`LossSpec.needs_reference`), the reference model's log-probs of the same tokens.
It returns the batch's mean loss and each pair's implicit rewards, from which the task logs `rewards/*`.

Built in (`--training-preference-loss`; beta is `--training-dpo-beta`):
- ``dpo``: the sigmoid loss of Rafailov et al. (2023), -log sigmoid(beta * d) with d the difference of the chosen
  and rejected log-ratios to the reference; ``label_smoothing`` e is the conservative variant,
  -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d). Rewards: beta * (log pi - log pi_ref).
- ``ipo``: Azar et al. (2023), (d' - 1 / (2 beta))^2 with d' the difference of the per-token log-ratios (TRL's
  normalisation: the summed log-ratio divided by the completion's tokens, as the IPO authors confirmed). Rewards as
  dpo.
- ``simpo``: Meng et al. (2024), reference-free, -log sigmoid(beta (a_c - a_r) - gamma) with a the length-normalised
  (per-token mean) log-prob; ``label_smoothing`` as dpo. Rewards: beta * a.
- ``orpo``: Hong et al. (2024), reference-free: the chosen completion's NLL (token mean over the batch) minus
  lambda * mean log sigmoid(log odds(a_c) - log odds(a_r)), odds(a) = exp(a) / (1 - exp(a)); lambda is beta, as in
  TRL. Rewards: beta * a.

A user's loss registers with `register_preference_loss(name, LossSpec(fn, needs_reference=...))` or is named as
`package.module:Name` (a `LossSpec`). All of it is a few tensor ops on (B,) vectors: no host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llm.errors import ConfigError
from llm.registry import Registry


@dataclass(frozen=True)
class PairLogps:
    """Per-pair (B,) tensors: summed completion log-probs of the policy (and of the reference, where computed) and
    the completions' token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def mean_chosen(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    def mean_rejected(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


@dataclass(frozen=True)
class PreferenceParams:
    """The losses' hyper-parameters: beta (orpo: lambda), label smoothing (dpo, simpo), gamma (simpo)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5


@dataclass(frozen=True)
class PreferenceOutput:
    """The batch's loss (a scalar), each pair's rewards (detached) and any extra metrics of the loss."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function and what it needs."""

    fn: Callable[[PairLogps, PreferenceParams], PreferenceOutput]
    needs_reference: bool = True
    label_smoothing: bool = False  # whether the loss defines label smoothing (refused otherwise)


PREFERENCE_LOSSES: Registry[LossSpec] = Registry("preference loss", "training.preference_loss")


def register_preference_loss(name: str, spec: LossSpec | None = None, *, override: bool = False) -> object:
    return PREFERENCE_LOSSES.register(name, spec, override=override)


def _smoothed_sigmoid(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(x) - e log sigmoid(-x), per pair."""
    loss = -F.logsigmoid(logits) * (1 - smoothing)
    return loss - F.logsigmoid(-logits) * smoothing if smoothing else loss


def _log_ratios(x: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.ref_chosen is not None and x.ref_rejected is not None, "this loss needs the reference's log-probs"
    return x.chosen - x.ref_chosen, x.rejected - x.ref_rejected


def dpo_loss(x: PairLogps, p: PreferenceParams) -> PreferenceOutput:
    chosen, rejected = _log_ratios(x)
    loss = _smoothed_sigmoid(p.beta * (chosen - rejected), p.label_smoothing).mean()
    return PreferenceOutput(loss, p.beta * chosen.detach(), p.beta * rejected.detach())


def ipo_loss(x: PairLogps, p: PreferenceParams) -> PreferenceOutput:
    chosen, rejected = _log_ratios(x)
    delta = chosen / x.chosen_tokens.clamp(min=1) - rejected / x.rejected_tokens.clamp(min=1)
    loss = ((delta - 1 / (2 * p.beta)) ** 2).mean()
    return PreferenceOutput(loss, p.beta * chosen.detach(), p.beta * rejected.detach())


def simpo_loss(x: PairLogps, p: PreferenceParams) -> PreferenceOutput:
    chosen, rejected = x.mean_chosen(), x.mean_rejected()
    loss = _smoothed_sigmoid(p.beta * (chosen - rejected) - p.gamma, p.label_smoothing).mean()
    return PreferenceOutput(loss, p.beta * chosen.detach(), p.beta * rejected.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation: expm1 near 0, log1p below -ln 2 (Maechler, 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(x: PairLogps, p: PreferenceParams) -> PreferenceOutput:
    chosen, rejected = x.mean_chosen(), x.mean_rejected()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -x.chosen.sum() / x.chosen_tokens.sum().clamp(min=1)  # the chosen completions' mean token NLL
    loss = nll - p.beta * ratio.mean()
    return PreferenceOutput(loss, p.beta * chosen.detach(), p.beta * rejected.detach(),
                            {"nll": nll.detach(), "log_odds_ratio": ratio.detach().mean()})


register_preference_loss("dpo", LossSpec(dpo_loss, needs_reference=True, label_smoothing=True))
register_preference_loss("ipo", LossSpec(ipo_loss, needs_reference=True))
register_preference_loss("simpo", LossSpec(simpo_loss, needs_reference=False, label_smoothing=True))
register_preference_loss("orpo", LossSpec(orpo_loss, needs_reference=False))


def get_preference_loss(name: str) -> LossSpec:
    """The registered loss ``name`` (or ``package.module:Name``); a miss is one line listing the valid names."""
    spec = PREFERENCE_LOSSES.get(name)
    if not isinstance(spec, LossSpec):
        raise ConfigError(f"training.preference_loss: {name!r} is not a LossSpec (got {type(spec).__name__})")
    return spec
