"""Parity of the preference losses with TRL's own code (the `dev` extra's `trl`): loss and gradients, fp32, 1e-5.

TRL computes its losses inside trainer methods; the tests call those methods with a stand-in `self` that holds
only what they read (beta, label smoothing, a device), so what runs is TRL's code, on TRL's log-probs
(`get_batch_logps`, `selective_log_softmax`) of the same logits:
- dpo (sigmoid) and ipo: `DPOTrainer._compute_loss` (its loss, with reference log-probs given as precomputed);
- dpo with label smoothing (TRL's DPO sigmoid dropped it in 1.x): `CPOTrainer.cpo_loss`'s smoothed sigmoid,
  given the log-ratios to the reference, the conservative-DPO formula;
- simpo: `CPOTrainer.cpo_loss` (loss_type simpo) on length-normalised log-probs;
- orpo: `ORPOTrainer.odds_ratio_loss`, plus the chosen completions' NLL (TRL's NLL also covers the prompt
  tokens; here, as in the paper, it covers the completion: the test gives TRL's cross-entropy the same labels).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llm.data.sft import IGNORE_INDEX
from llm.training.tasks.dpo_task import sequence_logps
from llm.training.tasks.preference_losses import PairLogps, PreferenceParams, get_preference_loss

trl = pytest.importorskip("trl")

B, T, V = 3, 7, 11


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits (2B, T, V) of chosen rows then rejected rows, shifted labels with a masked prompt and padding,
    and reference log-probs (2B,)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float32)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    for row in range(2 * B):
        start, end = 1 + row % 3, T - (row % 2)  # prompt tokens, then completion, then padding
        labels[row, :start] = IGNORE_INDEX
        labels[row, end:] = IGNORE_INDEX
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float32) * 10
    return logits, labels, ref


def _ours(name: str, params: PreferenceParams, logits: torch.Tensor, labels: torch.Tensor,
          ref: torch.Tensor) -> torch.Tensor:
    logps, tokens = sequence_logps(logits, labels)
    (chosen, rejected), (ct, rt) = logps.chunk(2), tokens.float().chunk(2)
    spec = get_preference_loss(name)
    rc, rr = ref.chunk(2) if spec.needs_reference else (None, None)
    return spec.fn(PairLogps(chosen, rejected, ct, rt, rc, rr), params).loss


def _trl_inputs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's layout: labels aligned with the inputs (TRL shifts them itself), logits with one more position."""
    pad = torch.full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([logits, torch.zeros_like(logits[:, :1])], 1), torch.cat([pad, labels], 1)


def _trl_dpo(loss_type: str, beta: float, logits: torch.Tensor, labels: torch.Tensor,
             ref: torch.Tensor) -> torch.Tensor:
    """`DPOTrainer._compute_loss` on a stand-in trainer and model (its log-probs from TRL's own helper)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import selective_log_softmax

    full_logits, full_labels = _trl_inputs(logits, labels)
    completion_mask = (full_labels != IGNORE_INDEX).long()

    def model(input_ids=None, labels=None, **kwargs):
        shifted = labels[:, 1:]
        per_token = selective_log_softmax(full_logits[:, :-1], shifted.clamp(min=0)) * (shifted != IGNORE_INDEX)
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(per_token, dtype=torch.bool))

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics={"train": _Lists()}, _total_train_tokens=0,
        _tp_size=1,
    )
    ref_chosen, ref_rejected = ref.chunk(2)
    inputs = {"input_ids": full_labels.clamp(min=0), "attention_mask": torch.ones_like(full_labels),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


class _Lists(dict):
    def __missing__(self, key):
        self[key] = []
        return self[key]


def _trl_cpo(loss_type: str, beta: float, smoothing: float, gamma: float, chosen: torch.Tensor,
             rejected: torch.Tensor) -> torch.Tensor:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=smoothing, simpo_gamma=gamma, loss_type=loss_type,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)[0].mean()


def _trl_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    full_logits, full_labels = _trl_inputs(logits, labels)
    return CPOTrainer.get_batch_logps(full_logits, full_labels, average_log_prob=average).chunk(2)


def _reference(case: str, params: PreferenceParams, logits: torch.Tensor, labels: torch.Tensor,
               ref: torch.Tensor) -> torch.Tensor:
    if case in ("dpo", "ipo"):
        return _trl_dpo("sigmoid" if case == "dpo" else "ipo", params.beta, logits, labels, ref)
    if case == "dpo-smoothed":
        chosen, rejected = _trl_logps(logits, labels, average=False)
        ref_chosen, ref_rejected = ref.chunk(2)
        return _trl_cpo("sigmoid", params.beta, params.label_smoothing, 0.0, chosen - ref_chosen,
                        rejected - ref_rejected)
    if case.startswith("simpo"):
        chosen, rejected = _trl_logps(logits, labels, average=True)
        return _trl_cpo("simpo", params.beta, params.label_smoothing, params.gamma, chosen, rejected)
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen, rejected = _trl_logps(logits, labels, average=True)
    trainer = SimpleNamespace(beta=params.beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)[0]
    full_logits, full_labels = _trl_inputs(logits, labels)
    nll = torch.nn.CrossEntropyLoss()(full_logits[:B, :-1].reshape(-1, V), full_labels[:B, 1:].reshape(-1))
    return nll - ratio.mean()


CASES = {
    "dpo": ("dpo", PreferenceParams(beta=0.3)),
    "dpo-smoothed": ("dpo", PreferenceParams(beta=0.3, label_smoothing=0.2)),
    "ipo": ("ipo", PreferenceParams(beta=0.4)),
    "simpo": ("simpo", PreferenceParams(beta=2.0, gamma=0.8)),
    "simpo-smoothed": ("simpo", PreferenceParams(beta=2.0, gamma=0.8, label_smoothing=0.1)),
    "orpo": ("orpo", PreferenceParams(beta=0.25)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_trl(case):
    name, params = CASES[case]
    logits, labels, ref = _batch()
    mine = logits.clone().requires_grad_(True)
    loss = _ours(name, params, mine, labels, ref)
    loss.backward()
    theirs = logits.clone().requires_grad_(True)
    expected = _reference(case, params, theirs, labels, ref)
    expected.backward()
    torch.testing.assert_close(loss, expected.to(loss.dtype), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5)
    assert mine.grad.abs().sum() > 0


def test_sequence_logps_equal_trls_and_skip_the_prompt_and_padding():
    logits, labels, _ = _batch(1)
    logps, tokens = sequence_logps(logits, labels)
    chosen, rejected = _trl_logps(logits, labels, average=False)
    torch.testing.assert_close(logps, torch.cat([chosen, rejected]), atol=1e-5, rtol=1e-5)
    assert tokens.tolist() == (labels != IGNORE_INDEX).sum(-1).tolist()
    changed = logits.clone()
    changed[labels == IGNORE_INDEX] += 5.0  # positions whose label is masked do not count
    torch.testing.assert_close(sequence_logps(changed, labels)[0], logps)
