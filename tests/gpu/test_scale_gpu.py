"""Tier 3 for issue 23's single-GPU features: float8 training's loss against bf16, selective recompute and
asynchronous checkpoints on a CUDA device. Marked `gpu`; skipped without CUDA (float8 also needs compute
capability >= 8.9 and torchao). `LLM_GPU_TIER_DEVICE=cpu` runs the recompute and async tests on the CPU (a dry run).
`benchmarks/gpu_check.sh` runs them on the GPU box."""

from __future__ import annotations

import pytest
import torch
from helpers import GPU_TIER_DEVICE, GPU_TIER_MARKS, GPU_TIER_ON_CUDA, gpu_lm_args, make_config, read_metrics
from safetensors.torch import load_file

from llm.training.optim.precision import float8_refusal
from llm.training.train import train_worker

DEVICE, ON_CUDA = GPU_TIER_DEVICE, GPU_TIER_ON_CUDA
pytestmark = GPU_TIER_MARKS


def lm_args(tmp_path, *extra: str) -> list[str]:
    # Every linear layer's dimensions are multiples of 16 (float8's rule): hidden 128, 4 heads of 32, 2 KV heads.
    return gpu_lm_args(tmp_path, DEVICE, "--training-lr", "3e-3", "--training-warmup", "0",
                       "--training-scheduler-type", "constant", *extra, hidden=128, batch=16)


def losses(tmp_path, *args: str, name: str) -> list[float]:
    config, task_class = make_config(tmp_path / name, *lm_args(tmp_path, *args), base=[])
    train_worker(0, 1, config, task_class)
    return [r["train/loss"] for r in read_metrics(tmp_path / name / "run") if "train/loss" in r]


@pytest.mark.skipif(not ON_CUDA or bool(float8_refusal(DEVICE)), reason="float8 needs CUDA >= 8.9 and torchao")
def test_fp8_loss_follows_bf16(tmp_path):
    bf16 = losses(tmp_path, "--training-max-steps", "40", "--training-precision", "bf16", name="bf16")
    fp8 = losses(tmp_path, "--training-max-steps", "40", "--training-precision", "fp8", name="fp8")
    assert len(fp8) == 40 and all(loss is not None for loss in fp8)
    assert sum(fp8[-5:]) / 5 < 0.8 * sum(fp8[:5]) / 5, fp8  # it learns
    # Within 5% of bf16's loss over the last 10 steps (float8's rounding moves the trajectory, not its level).
    assert sum(fp8[-10:]) == pytest.approx(sum(bf16[-10:]), rel=0.05), (fp8[-10:], bf16[-10:])


def test_selective_recompute_trains_as_no_recompute(tmp_path):
    common = ["--training-max-steps", "10", "--training-precision", "bf16" if ON_CUDA else "fp32"]
    plain = losses(tmp_path, *common, name="none")
    selective = losses(tmp_path, *common, "--training-activation-checkpointing", "selective", name="selective")
    assert selective == pytest.approx(plain, rel=1e-3, abs=1e-4)


def test_async_checkpoint_from_device_memory_resumes_like_a_sync_one(tmp_path):
    common = ["--training-max-steps", "6", "--checkpoint-interval", "2", "--training-precision", "fp32"]
    losses(tmp_path, *common, name="sync")
    losses(tmp_path, *common, "--checkpoint-async", name="async")
    for step in (2, 4):
        name = f"run/checkpoints/step-{step:08d}/model.safetensors"
        sync, done = load_file(str(tmp_path / "sync" / name)), load_file(str(tmp_path / "async" / name))
        assert sync.keys() == done.keys() and all(torch.equal(sync[k], done[k]) for k in sync)
