"""The regression task on a CSV: the target standardized with the training split's statistics, kept with the
model's weights, and val metrics (MSE, MAE, RMSE) reported in the target's own units."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import read_metrics
from safetensors.torch import load_file

from llm.artifacts.checkpoint import load_weights
from llm.data.regression import RegressionDataModule
from llm.training.tasks.regression_task import RegressionTask, StandardizedTarget
from llm.training.train import main as train_main
from llm.training.train import parse_config

FEATURES = "area,rooms,age,distance"
WEIGHTS = torch.tensor([120.0, 90.0, -60.0, 40.0])  # price per standard deviation of each feature


def write_house_prices(path, rows: int = 500, seed: int = 0) -> None:
    """A house-price CSV: price = 400 + features . WEIGHTS + noise (std 50): mean ~400, std ~175. Each feature
    column is in its own units (tens of square metres, a few rooms, ...), as a real table would be."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 4, generator=gen)
    price = 400 + z @ WEIGHTS + 50 * torch.randn(rows, generator=gen)
    features = z * torch.tensor([30.0, 1.2, 15.0, 8.0]) + torch.tensor([100.0, 3.0, 40.0, 12.0])
    lines = [f"{FEATURES},price"] + [",".join(f"{v:.3f}" for v in [*f, p]) for f, p in zip(features.tolist(),
                                                                                            price.tolist())]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def house_run(tmp_path_factory):
    """The regression task with its defaults (10 epochs) on the CSV: about 4 s on one CPU thread."""
    root = tmp_path_factory.mktemp("house")
    write_house_prices(root / "houses.csv")
    argv = ["--task", "regression", "--data-path", str(root / "houses.csv"), "--training-device", "cpu",
            "--training-callbacks", "MetricsLogger", "--logging-log-dir", str(root / "run")]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(argv) == 0
    finally:
        torch.set_num_threads(before)
    config, _, _ = parse_config(argv)
    data = RegressionDataModule(config.data, batch_size=config.training.batch_size, seed=config.seed)
    data.setup()
    return config, data, root / "run"


def test_house_prices_learn_better_than_the_training_mean(house_run):
    config, data, run = house_run
    assert config.training.epochs == RegressionTask.config_defaults["training"]["epochs"]
    y_train, y_val = data.train_set.tensors[1].double(), data.val_set.tensors[1].double()
    assert 370 < y_train.mean() < 430 and 150 < y_train.std() < 200
    baseline = (y_val - y_train.mean()).abs().mean().item()  # always predicting the training mean
    final = [m for m in read_metrics(run) if "val/mae" in m][-1]
    # Measured over 3 data x 2 run seeds: 0.46-0.60 of the baseline (the noise alone leaves ~0.3).
    assert final["val/mae"] < 0.75 * baseline, (final, baseline)


def test_val_metrics_are_in_target_units_and_the_statistics_travel_with_the_weights(house_run):
    config, data, run = house_run
    y_train = data.train_set.tensors[1].double()
    # The training split's statistics, not the whole file's: the validation rows never shape them.
    assert data.target_mean == pytest.approx(y_train.mean().item())
    assert data.target_std == pytest.approx(y_train.std(correction=0).item())
    everything = torch.cat([y_train, data.val_set.tensors[1].double()])
    assert data.target_mean != pytest.approx(everything.mean().item(), abs=1e-3)
    saved = load_file(run / "model.safetensors")
    assert saved["target.mean"].item() == pytest.approx(data.target_mean)
    assert saved["target.std"].item() == pytest.approx(data.target_std)
    # A model built with no data (defaults 0 and 1) predicts in target units once the run's weights load, and
    # those predictions give exactly the validation metrics the run logged.
    model = RegressionTask(config).build_model()
    assert model.target.mean.item() == 0.0
    load_weights(model, run / "model.safetensors")
    with torch.no_grad():
        error = model.eval()(data.val_set.tensors[0]).squeeze(-1).double() - data.val_set.tensors[1].double()
    final = [m for m in read_metrics(run) if "val/mae" in m][-1]
    assert final["val/mae"] == pytest.approx(error.abs().mean().item(), rel=1e-4)
    assert final["val/mse"] == pytest.approx(error.square().mean().item(), rel=1e-4)
    assert final["val/rmse"] == pytest.approx(math.sqrt(final["val/mse"]), rel=1e-9)
    # The loss is the MSE of the standardized target: the same errors in units of the training std.
    assert final["val/loss"] == pytest.approx(final["val/mse"] / data.target_std**2, rel=1e-4)


def test_standardized_target_round_trips_and_keeps_fp32():
    target = StandardizedTarget(400.0, 175.0)
    y = torch.tensor([225.0, 400.0, 750.0])
    assert target.standardize(y).tolist() == [-1.0, 0.0, 2.0]
    assert torch.equal(target(target.standardize(y)), y)
    assert target(torch.tensor([1.0], dtype=torch.bfloat16)).dtype == torch.float32
    assert set(target.state_dict()) == {"mean", "std"}
