"""The regression task's CSV reader and config check: every cell finite, every row as wide as the header."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import TINY_REGRESSION

from llm.data.regression import NUM_FEATURES, RegressionDataModule, csv_columns, read_csv, target_stats
from llm.errors import ConfigError
from llm.training.train import parse_config


def write(tmp_path, text, name="d.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def refused(path, *fragments, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        read_csv(path, **kwargs)
    message = str(info.value)
    assert message.startswith("data.path: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_clean_csv_is_read_and_standardized(tmp_path):
    x, y = read_csv(write(tmp_path, "a,b,y\n1,2,3\n4,5,6\n\n7,8,9\n"))  # a blank line is skipped
    assert x.shape == (3, 2, 1) and x.dtype == y.dtype == torch.float32
    assert torch.allclose(x.squeeze(-1).mean(0), torch.zeros(2), atol=1e-6)
    assert y.tolist() == [3.0, 6.0, 9.0]


@pytest.mark.parametrize("cell", ["nan", "NaN", "inf", "-Infinity", "1e400"])
def test_non_finite_cells_are_refused_with_their_line(tmp_path, cell):
    path = write(tmp_path, f"a,b,y\n1,2,3\n4,{cell},6\n7,8,9\n")
    refused(path, "d.csv", "line 3", "column 'b'", "not a finite number")


def test_rows_wider_or_narrower_than_the_header_are_refused(tmp_path):
    refused(write(tmp_path, "a,b,y\n1,2,3\n4,5,6,7\n"), "line 3 has 4 columns, the header has 3")
    refused(write(tmp_path, "a,b,y\n1,2,3\n4,5\n7,8,9\n"), "line 3 has 2 columns, the header has 3")


def test_targets_whose_square_overflows_fp32_are_refused(tmp_path):
    refused(write(tmp_path, "a,y\n1,2\n2,1e30\n3,4\n"), "line 3", "target 1e+30", "rescale")
    x, _ = read_csv(write(tmp_path, "a,y\n1e300,2\n-1e300,1\n3,4\n"))  # features: standardized in float64
    assert torch.isfinite(x).all()


def test_non_numeric_and_special_files_are_refused(tmp_path):
    refused(write(tmp_path, "a,y\n1,2\nx,3\n4,5\n"), "line 3 has a non-numeric value in column 'a'")
    refused("/dev/zero", "not a regular file (a character device)")
    os.mkfifo(tmp_path / "pipe.csv")
    refused(str(tmp_path / "pipe.csv"), "a FIFO")
    refused(write(tmp_path, "a,y\n1,2\n3,4\n5,6\n"), "over data.max_file_bytes=4", max_file_bytes=4)
    with pytest.raises(ConfigError, match="a FIFO"):
        csv_columns(str(tmp_path / "pipe.csv"))


@pytest.mark.parametrize("text, fragments", [
    ("", ["line 1: the file is empty", "header row"]),
    ("\n\n", ["line 1: the file is empty"]),
    ("y\n1\n2\n3\n", ["line 1 has 1 column", "at least 2"]),
    ("1,2,3\n4,5,6\n7,8,9\n", ["line 1 is numbers ('1,2,3'), not a header", "name the columns"]),
    ("a,y\n\n1,2\n", ["line 3: 1 data rows after the header", "at least 2"]),
    ("a,y\n", ["line 1: 0 data rows"]),
])
def test_files_it_cannot_use_are_refused_with_their_line(tmp_path, text, fragments):
    refused(write(tmp_path, text), "d.csv", *fragments)


def test_the_target_is_standardized_with_the_training_split_only(tmp_path):
    rows = "\n".join(f"{i},{3 * i + 100}" for i in range(40))
    config, _, _ = parse("--data-path", write(tmp_path, "x,y\n" + rows + "\n"), "--data-val-fraction", "0.25")
    data = RegressionDataModule(config.data, batch_size=config.training.batch_size, seed=config.seed)
    data.setup()
    y_train, y_val = data.train_set.tensors[1].double(), data.val_set.tensors[1].double()
    assert len(y_val) == 10
    assert data.target_mean == pytest.approx(y_train.mean().item())
    assert data.target_std == pytest.approx(y_train.std(correction=0).item())
    assert data.target_mean != pytest.approx(torch.cat([y_train, y_val]).mean().item())
    assert 100 <= y_val.min() and y_val.max() <= 217  # batches keep the target's units
    assert target_stats(torch.tensor([5.0, 5.0, 5.0])) == (5.0, 1.0)  # constant: centred, not divided by 0
    assert target_stats(torch.tensor([7.0])) == (7.0, 1.0)


def parse(*args):
    return parse_config([*TINY_REGRESSION, *args])


def test_a_csv_wider_than_the_model_positions_is_a_config_error(tmp_path):
    wide = write(tmp_path, ",".join(f"c{i}" for i in range(20)) + "\n" + ",".join(["1"] * 20) + "\n")
    with pytest.raises(ConfigError, match=r"model.max_seq_len: .* 19 feature columns.*--model-max-seq-len 20"):
        parse("--data-path", wide, "--model-max-seq-len", "16")
    config, _, _ = parse("--data-path", wide, "--model-max-seq-len", "20")
    assert config.model.max_seq_len == 20


def test_regression_refuses_special_files_before_the_extension_check(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        parse("--data-path", "/dev/zero")
    with pytest.raises(ConfigError, match="no such file"):
        parse("--data-path", str(tmp_path / "missing.csv"))


def test_classification_says_it_takes_no_data_path(tmp_path):
    path = write(tmp_path, "a,y\n1,2\n")
    with pytest.raises(ConfigError, match="data.path: the classification task .* reads no data path"):
        parse_config(["--task", "classification", "--data-path", path])
    config, _, _ = parse_config(["--task", "classification"])
    assert config.data.path == ""


def test_a_data_module_is_built_from_plain_values_without_a_run_config():
    """Data knows nothing of training: the data section's values, a batch size and a seed are all it takes."""
    from types import SimpleNamespace

    data = SimpleNamespace(path="", num_samples=40, seq_len=4, val_fraction=0.25, num_workers=0, max_file_bytes=0)
    dm = RegressionDataModule(data, batch_size=6, seed=3)
    dm.setup()
    assert dm.config is None and (dm.seed, dm.batch_size) == (3, 6)
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(x.shape == (6, 4, NUM_FEATURES) and y.shape == (6,) for x, y in batches)
    again = RegressionDataModule(data, batch_size=6, seed=3)
    again.setup()
    assert torch.equal(next(iter(again.train_dataloader()))[0], batches[0][0])  # the seed given, not a config's
