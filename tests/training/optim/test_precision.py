"""Precision `auto` (what it picks, where it is recorded) and the check that processes fit the visible GPUs."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import TINY_REGRESSION, call_main

from llm.errors import ConfigError
from llm.training.optim import precision as P
from llm.training.parallel.distributed import check_processes_fit_devices
from llm.training.train import build_engine, main


def test_auto_is_bf16_on_a_cpu_with_bf16_instructions_else_fp32(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: True)
    assert P.resolve_precision("auto", cpu)[0] == "bf16"
    monkeypatch.setattr(P, "cpu_has_fast_bf16", lambda: False)
    assert P.resolve_precision("auto", cpu) == ("fp32", "auto: no fast bf16 on this cpu")
    assert P.resolve_precision("fp16", cpu) == ("fp16", "as configured")  # an explicit choice is kept


def test_auto_on_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert P.resolve_precision("auto", torch.device("cuda", 0))[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert P.resolve_precision("auto", torch.device("cuda", 0)) == ("fp32", "auto: Some GPU has no fast bf16")


def test_cpu_detection_matches_torch_capabilities():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert P.cpu_has_fast_bf16() == expected


def test_the_choice_is_logged_and_written_into_config_yaml(tmp_path):
    args = [*TINY_REGRESSION, "--training-precision", "auto", "--training-max-steps", "2", "--logging-log-dir", "run"]
    proc = call_main(main, args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    chosen, why = P.resolve_precision("auto", torch.device("cpu"))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["training"]["precision"] == chosen
    assert f"precision {chosen} ({why})" in proc.stderr


def test_engine_resolves_auto_without_the_cli(tiny_config):
    config, task_class = tiny_config("--training-precision", "auto")
    build_engine(config, task_class, callbacks=[])
    assert config.training.precision == P.resolve_precision("auto", torch.device("cpu"))[0]


def test_task_defaults_keep_tiny_models_in_fp32():
    from llm.training.train import parse_config

    assert parse_config(["--task", "regression"])[0].training.precision == "fp32"
    assert parse_config(["--task", "classification"])[0].training.precision == "fp32"


@pytest.mark.parametrize(
    ("device", "processes", "gpus", "message"),
    [
        ("auto", 2, 1, "2 processes per machine but this machine has 1 visible GPU(s)"),
        ("cuda", 4, 2, "start at most 2"),
        ("cuda:0", 2, 2, "puts all 2 local processes on one GPU"),
    ],
)
def test_more_processes_than_gpus_is_refused(monkeypatch, device, processes, gpus, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ConfigError, match="--training-device cpu|cuda:LOCAL_RANK") as info:
        check_processes_fit_devices(device, processes)
    assert message in str(info.value)


def test_processes_that_fit_are_accepted(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_processes_fit_devices("auto", 2)
    check_processes_fit_devices("cuda", 1)
    check_processes_fit_devices("cpu", 8)  # CPU processes need no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_processes_fit_devices("auto", 4)  # auto without CUDA is the CPU


def test_spawn_onto_too_few_gpus_is_one_line_before_anything_starts(tmp_path):
    # A CUDA device this machine does not have: refused at validation, exit 2, nothing written.
    proc = call_main(main, [*TINY_REGRESSION, "--training-device", "cuda:99", "--distributed-nproc-per-node", "2",
                            "--logging-log-dir", "run"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: training.device: invalid value 'cuda:99'")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
