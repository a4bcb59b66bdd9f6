"""`--training-precision fp8` (torchao float8 training): refused with one line where it cannot run (no CUDA GPU of
compute capability >= 8.9, or no torchao). Its loss parity with bf16 is checked by the GPU tier (tests/gpu)."""

from __future__ import annotations

import pytest
import torch
from helpers import call_main

from llm.training.optim.precision import float8_eligible, float8_refusal
from llm.training.train import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a CUDA GPU")
def test_fp8_without_a_gpu_is_one_line_exit_2(tmp_path):
    proc = call_main(main, ["--task", "regression", "--training-precision", "fp8"], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "training.precision" in lines[0] and "'fp8'" in lines[0] and "compute capability >= 8.9" in lines[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    assert "cpu" in float8_refusal("cpu")


def test_float8_converts_only_linears_of_multiples_of_16_and_not_the_head():
    assert float8_eligible(torch.nn.Linear(32, 64), "layers.0.mlp.up_proj")
    assert not float8_eligible(torch.nn.Linear(32, 24), "layers.0.mlp.up_proj")
    assert not float8_eligible(torch.nn.Linear(32, 64), "lm_head")
    assert not float8_eligible(torch.nn.Embedding(32, 64), "embed_tokens")
