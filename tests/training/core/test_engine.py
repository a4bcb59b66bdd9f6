"""The engine: learning, accumulation, validation averaging, final weights, non-finite policy."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config, read_metrics

from llm.artifacts.checkpoint import load_weights
from llm.training.core.engine import MetricAccumulator
from llm.training.train import train_worker


def test_overfits_one_batch(tmp_path):
    # 20 samples, batch 18 -> exactly one training batch, seen 150 times.
    config, task_class = make_config(
        tmp_path, "--data-num-samples", "20", "--training-batch-size", "18", "--training-max-steps", "150",
        "--training-epochs", "1000", "--training-lr", "3e-3", "--training-scheduler-type", "constant",
        "--data-val-fraction", "0.1",
    )
    train_worker(0, 1, config, task_class)
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert losses[0] > 0.3 and losses[-1] < 0.02 * losses[0]


def test_gradient_accumulation_matches_bigger_batch(tmp_path, make_engine):
    def final_weights(*args):
        engine = make_engine("--training-max-steps", "3", *args, workdir=tmp_path / str(len(args)), callbacks=[],
                             run=True)
        return {k: v.clone() for k, v in engine.unwrapped_model.state_dict().items()}

    big = final_weights("--training-batch-size", "16")
    accumulated = final_weights("--training-batch-size", "8", "--training-grad-accum-steps", "2")
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-6)


def test_validation_is_sample_weighted_over_uneven_batches(make_engine):
    # 10% of 250 = 25 validation samples in batches of 16 and 9: the mean must weight by size.
    engine = make_engine("--data-num-samples", "250", "--training-max-steps", "1", callbacks=[])
    engine.setup()
    logs = engine.validate()
    model, crit = engine.unwrapped_model.eval(), torch.nn.MSELoss(reduction="sum")
    x, y = engine.data_module.val_set.tensors
    with torch.no_grad():
        expected = crit(model(x).squeeze(-1), y).item() / len(y)
    assert logs["val/mse"] == pytest.approx(expected, rel=1e-5)  # in target units (val/loss: standardized)


def test_final_weights_saved_as_safetensors(tmp_path, make_engine):
    engine = make_engine("--training-max-steps", "2", callbacks=[], run=True)
    fresh = type(engine.task)(engine.config).build_model()
    load_weights(fresh, tmp_path / "run" / "model.safetensors")
    for a, b in zip(fresh.state_dict().values(), engine.unwrapped_model.state_dict().values()):
        assert torch.equal(a, b)


def test_tensor_metrics_do_not_sync_between_log_steps(make_engine, monkeypatch):
    """`.item()`/`.tolist()` on metrics happen only at log steps (plus the one-bool finite check)."""
    engine = make_engine("--training-max-steps", "8", "--training-log-interval", "4", "--training-val-interval", "0",
                         callbacks=[])
    calls = {"tolist": 0}
    original = MetricAccumulator.compute

    def counting(self, *args, **kwargs):
        calls["tolist"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MetricAccumulator, "compute", counting)
    engine.data_module.val_dataloader = lambda: None
    engine.run()
    assert calls["tolist"] == 2  # steps 4 and 8


def test_moe_aux_loss_reaches_the_loss(tmp_path):
    config, task_class = make_config(
        tmp_path, "--training-max-steps", "2", "--model-use-moe", "--model-num-experts", "4", "--model-top-k", "2",
    )
    train_worker(0, 1, config, task_class)
    logged = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert all(m["train/aux_loss"] > 0 for m in logged)
    # Routing metrics: unscaled losses, and per layer the peak load and each expert's share of the window's tokens.
    for m in logged:
        assert m["train/moe_balance_loss"] > 0 and m["train/moe_z_loss"] > 0
        shares = [m[f"moe/layer0/expert{e}"] for e in range(4)]
        assert sum(shares) == pytest.approx(1.0) and m["moe/layer0/max_over_mean"] == pytest.approx(4 * max(shares))
    log = (tmp_path / "run" / "train.log").read_text()
    assert "train/moe_balance_loss" in log and "moe/layer0" not in log  # the console skips per-expert detail
