"""The `dpo` task: learning the demo, the reference (a frozen copy, LoRA's base, precomputed, an init-from run),
the metrics, config checks, bitwise resume, and 2 DDP processes = 1."""

from __future__ import annotations

import pytest
import torch
from helpers import Crash, read_metrics, run_cli, tiny_engine
from safetensors.torch import load_file

from llm.errors import ConfigError
from llm.training.core.config import Config
from llm.training.tasks.dpo_task import AdaptersOff, DPOTask, FrozenCopy
from llm.training.train import main as train_main

TINY_DPO = [
    "--task", "dpo", "--model-hidden-size", "32", "--model-num-layers", "2", "--model-num-heads", "4",
    "--training-batch-size", "16", "--training-lr", "1e-2", "--training-warmup", "5", "--training-device", "cpu",
    "--training-callbacks", "LRSchedulerCallback", "--logging-loggers", "jsonl",
]
# A smaller run for the tests that check the machinery, not the learning: 80 training pairs, 10 steps an epoch.
SMALL = [*TINY_DPO, "--model-num-layers", "1", "--data-num-samples", "100", "--training-batch-size", "8",
         "--data-val-fraction", "0.2", "--training-val-max-batches", "1"]
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected")


def test_dpo_on_the_demo_raises_val_reward_accuracy_above_0_9(tmp_path):
    run = tmp_path / "run"
    assert train_main([*TINY_DPO, "--data-num-samples", "800", "--training-max-steps", "20", "--training-val-interval",
                       "20", "--training-log-interval", "5", "--logging-log-dir", str(run)]) == 0
    records = read_metrics(run)
    train = [r for r in records if "train/loss" in r]
    [val] = [r for r in records if "val/loss" in r]
    assert all(f"train/{k}" in train[0] and f"val/{k}" in val for k in REWARDS)
    assert train[0]["train/rewards/accuracy"] < 0.8  # the policy starts as its reference: no preference yet
    assert val["val/rewards/accuracy"] > 0.9 and val["val/loss"] < 0.6
    assert val["val/rewards/margin"] == pytest.approx(val["val/rewards/chosen"] - val["val/rewards/rejected"],
                                                      abs=1e-6)


@pytest.mark.parametrize("flags", [
    pytest.param([], id="frozen-copy"),
    pytest.param(["--training-dpo-precompute-ref"], id="precomputed"),
    pytest.param(["--training-lora-rank", "4"], id="lora-adapters-off"),
])
def test_at_the_first_step_the_policy_is_its_reference(tmp_path, flags):
    run = tmp_path / "run"
    assert train_main([*SMALL, *flags, "--training-max-steps", "1", "--training-log-interval", "1",
                       "--logging-log-dir", str(run)]) == 0
    first = read_metrics(run)[0]
    assert first["step"] == 1 and first["train/logps/chosen"] < -1.0
    assert first["train/rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["train/rewards/rejected"] == pytest.approx(0.0, abs=1e-5)


def test_lora_keeps_no_second_copy_and_its_reference_stays_the_base(tmp_path):
    engine = tiny_engine(tmp_path, "--training-lora-rank", "4", "--training-max-steps", "4", base=SMALL)
    engine.setup()
    reference = engine.criterion.reference
    assert isinstance(reference, AdaptersOff) and reference.model is engine.unwrapped_model
    batch = next(iter(engine.data_module.val_dataloader()))
    ids, labels = batch[0].transpose(0, 1).flatten(0, 1), batch[1].transpose(0, 1).flatten(0, 1)
    before = reference(ids, labels)
    engine.run()
    after = reference(ids, labels)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)  # the base: frozen, adapters off
    adapters = [p for n, p in engine.unwrapped_model.named_parameters() if "lora_B" in n]
    assert adapters and all(p.requires_grad for p in adapters) and any(p.abs().sum() > 0 for p in adapters)
    assert engine.unwrapped_model.training


def test_the_frozen_copy_is_frozen_and_the_reference_free_losses_keep_none(tmp_path):
    engine = tiny_engine(tmp_path, "--training-max-steps", "2", base=SMALL)
    engine.setup()
    reference = engine.criterion.reference
    assert isinstance(reference, FrozenCopy) and reference.model is not engine.unwrapped_model
    assert not reference.model.training and not any(p.requires_grad for p in reference.model.parameters())
    engine = tiny_engine(tmp_path, "--training-preference-loss", "simpo", "--training-max-steps", "2", base=SMALL)
    engine.setup()
    assert engine.criterion.reference is None


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_every_loss_trains(tmp_path, loss):
    run = tmp_path / "run"
    assert train_main([*SMALL, "--training-preference-loss", loss, "--training-max-steps", "3",
                       "--training-log-interval", "3", "--logging-log-dir", str(run)]) == 0
    records = read_metrics(run)
    assert records[0]["train/loss"] == pytest.approx(records[0]["train/loss"])  # finite
    assert "val/rewards/accuracy" in records[-1]
    if loss == "orpo":
        assert "val/nll" in records[-1] and "val/log_odds_ratio" in records[-1]


def test_init_from_an_sft_run_is_the_reference(tmp_path):
    sft = ["--task", "sft", "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "4",
           "--data-num-samples", "64", "--training-batch-size", "8", "--training-max-steps", "2",
           "--training-val-max-batches", "1", "--training-device", "cpu", "--training-callbacks",
           "LRSchedulerCallback", "--logging-loggers", "jsonl", "--logging-log-dir", str(tmp_path / "sft")]
    assert train_main(sft) == 0
    run = tmp_path / "dpo"
    dpo = ["--task", "dpo", "--model-init-from", str(tmp_path / "sft"), "--data-num-samples", "100",
           "--training-batch-size", "8", "--training-max-steps", "2", "--training-log-interval", "1",
           "--training-val-max-batches", "1", "--training-device", "cpu", "--training-callbacks",
           "LRSchedulerCallback", "--logging-loggers", "jsonl", "--logging-log-dir", str(run)]
    assert train_main(dpo) == 0
    first, second = [r for r in read_metrics(run) if "train/loss" in r]
    assert first["train/rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert second["train/rewards/chosen"] != pytest.approx(0.0, abs=1e-7)  # the policy moved, its reference not


def _config(**training) -> Config:
    config = Config(task="dpo")
    for name, value in training.items():
        setattr(config.training, name, value)
    return config


@pytest.mark.parametrize("training, strategy, message", [
    ({"preference_loss": "dpp"}, "ddp", "unknown preference loss 'dpp'.*did you mean"),
    ({"dpo_beta": 0.0}, "ddp", "training.dpo_beta"),
    ({"dpo_label_smoothing": 0.5}, "ddp", "training.dpo_label_smoothing"),
    ({"preference_loss": "ipo", "dpo_label_smoothing": 0.1}, "ddp", "ipo loss defines no label smoothing"),
    ({"preference_loss": "orpo", "dpo_precompute_ref": True}, "ddp", "uses no reference model"),
    ({}, "fsdp", "distributed.strategy.*runs on ddp"),
])
def test_preference_fields_are_checked(training, strategy, message):
    config = _config(**training)
    config.distributed.strategy = strategy
    with pytest.raises(ConfigError, match=message):
        DPOTask.validate_config(config)


def test_a_users_loss_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_pref.py").write_text(
        "from llm.training.tasks.preference_losses import LossSpec, dpo_loss\n"
        "HALF = LossSpec(lambda x, p: dpo_loss(x, p), needs_reference=True)\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    assert train_main([*SMALL, "--training-preference-loss", "my_pref:HALF", "--training-max-steps", "1",
                       "--training-log-interval", "1", "--logging-log-dir", str(run)]) == 0
    assert read_metrics(run)[0]["train/rewards/chosen"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("flags", [
    pytest.param([], id="frozen-copy"),
    pytest.param(["--training-dpo-precompute-ref", "--training-lora-rank", "4"], id="lora-precomputed"),
])
def test_resume_is_bitwise(tmp_path, flags):
    common = [*SMALL, *flags, "--training-max-steps", "8", "--checkpoint-interval", "4", "--training-log-interval",
              "1", "--training-callbacks", "LRSchedulerCallback", "ModelCheckpoint"]
    tiny_engine(tmp_path, *common, "--logging-log-dir", str(tmp_path / "a"), base=[], run=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_engine(tmp_path, *common, "--logging-log-dir", str(tmp_path / "b"), base=[], extra_callbacks=(Crash(6),),
                    run=True)
    tiny_engine(tmp_path, *common, "--logging-log-dir", str(tmp_path / "b"), base=[], run=True)
    a, b = (load_file(tmp_path / run / "checkpoints" / "step-00000008" / "model.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {run: {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / run) if "train/loss" in r}
              for run in "ab"}
    assert losses["a"] == losses["b"]


@pytest.mark.slow
def test_two_ddp_processes_equal_one(tmp_path):
    common = [*SMALL, "--training-max-steps", "4", "--training-log-interval", "1"]
    one = run_cli([*common, "--logging-log-dir", str(tmp_path / "one")], cwd=tmp_path)
    two = run_cli([*common, "--training-batch-size", "4", "--distributed-nproc-per-node", "2", "--logging-log-dir",
                   str(tmp_path / "two")], cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    la, lb = ([r["train/loss"] for r in read_metrics(tmp_path / run) if "train/loss" in r] for run in ("one", "two"))
    assert la == pytest.approx(lb, abs=1e-5)
