"""Tier 3: what only a GPU shows. Every test here is marked `gpu` and skipped without CUDA.

`LLM_GPU_TIER_DEVICE=cpu` runs the same code on the CPU (the CUDA-only assertions are then skipped): a dry
run that keeps these tests working on a machine without a GPU, where they are written and reviewed.
`benchmarks/gpu_check.sh` runs the tier on the GPU box.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import GPU_TIER_DEVICE, GPU_TIER_MARKS, GPU_TIER_ON_CUDA, gpu_lm_args, make_config, read_metrics

from llm.config import replace_values
from llm.models import DecoderModel
from llm.training.core.callbacks import Callback
from llm.training.train import train_worker

DEVICE, ON_CUDA = GPU_TIER_DEVICE, GPU_TIER_ON_CUDA
pytestmark = GPU_TIER_MARKS


def lm_args(tmp_path, *extra: str) -> list[str]:
    return gpu_lm_args(tmp_path, DEVICE, *extra)


def train(tmp_path, *args: str, name: str = "run") -> list[dict]:
    config, task_class = make_config(tmp_path / name, *lm_args(tmp_path, *args), base=[])
    train_worker(0, 1, config, task_class)
    return read_metrics(tmp_path / name / "run")


MOE = ["--model-use-moe", "--model-num-experts", "4", "--model-top-k", "2"]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_training_steps_learn(tmp_path, moe, precision, compiled):
    args = ["--training-max-steps", "30", "--training-precision", precision, "--training-lr", "3e-3"]
    args += (MOE if moe else []) + (["--training-compile"] if compiled else [])
    records = train(tmp_path, *args)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 30 and all(loss is not None for loss in losses)  # None: a non-finite value
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    if moe:
        assert all(r["train/aux_loss"] > 0 for r in records if "train/aux_loss" in r)


def test_exact_resume_on_the_same_device(tmp_path):
    # A constant lr: the interrupted run (max_steps 4) then follows the same schedule as the straight one.
    common = ["--training-max-steps", "8", "--training-precision", "bf16", "--checkpoint-interval", "4",
              "--training-warmup", "0", "--training-scheduler-type", "constant"]
    straight = [r["train/loss"] for r in train(tmp_path, *common, name="straight") if "train/loss" in r]
    # The same run, stopped after its step-4 checkpoint and resumed from it.
    config, task_class = make_config(tmp_path / "resumed", *lm_args(tmp_path, *common), base=[])
    config = replace_values(config, {"training.max_steps": 4})  # the resolved config is frozen
    train_worker(0, 1, config, task_class)
    config, task_class = make_config(tmp_path / "resumed", *lm_args(tmp_path, *common), base=[])
    train_worker(0, 1, config, task_class)
    resumed = [r["train/loss"] for r in read_metrics(tmp_path / "resumed" / "run") if "train/loss" in r]
    assert resumed[:4] == straight[:4] and resumed[4:] == pytest.approx(straight[4:], rel=1e-5, abs=1e-6)


def test_kv_cache_generation_matches_full_recompute():
    torch.manual_seed(0)
    model = DecoderModel.tiny().to(DEVICE).eval()
    prompt = torch.randint(0, 256, (5,), device=DEVICE)
    cached = model.generate(prompt, 20, temperature=0.0)
    ids = prompt
    with torch.no_grad():
        for _ in range(20):  # greedy without a cache: the whole sequence each time
            ids = torch.cat([ids, model(ids[None])[0, -1].argmax()[None]])
    assert torch.equal(cached.to(ids.device), ids)


def test_hf_parity_on_the_device():
    transformers = pytest.importorskip("transformers")
    from llm.models.hf import load_hf

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_hf(tmp).to(DEVICE).eval()
    ids = torch.randint(0, 96, (2, 17), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).float(), hf(ids).logits.float(), atol=2e-4, rtol=2e-4)


def test_fsdp_with_world_size_one(tmp_path):
    import datetime

    import torch.distributed as dist

    from llm.training.parallel import fsdp
    from llm.training.parallel.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if ON_CUDA else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        reference = DecoderModel.tiny().to(DEVICE)
        model = DecoderModel.tiny().to(DEVICE)
        model.load_state_dict(reference.state_dict())
        model = fsdp.shard_model(model, torch.device(DEVICE), "fp32")
        assert fsdp.is_fsdp(model)
        ids = torch.randint(0, 256, (2, 16), device=DEVICE)
        for net in (reference, model):
            opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
            for _ in range(3):
                net(ids).float().logsumexp(-1).mean().backward()
                opt.step()
                opt.zero_grad()
        fsdp.save_full_weights(model, tmp_path / "full.safetensors")
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / "full.safetensors"))
        for name, tensor in reference.state_dict().items():
            if name in saved:
                torch.testing.assert_close(saved[name].to(tensor.device), tensor, atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not ON_CUDA, reason="CUDA memory statistics")
def test_peak_memory_stays_within_its_bound(tmp_path):
    torch.cuda.reset_peak_memory_stats()
    args = ["--training-max-steps", "4", "--training-precision", "bf16", "--model-hidden-size", "256",
            "--model-num-layers", "4", "--data-seq-len", "64", "--training-batch-size", "8"]
    config, task_class = make_config(tmp_path, *lm_args(tmp_path, *args), base=[])
    train_worker(0, 1, config, task_class)
    peak = torch.cuda.max_memory_allocated()
    params = sum(p.numel() for p in DecoderModel(config.model).parameters())
    states = 16 * params  # fp32 weights, gradients and two AdamW moments
    b, t, h, layers = 8, 64, 256, 4
    activations = 34 * b * t * h * layers + 10 * b * t * config.model.vocab_size  # bf16 blocks + logits and grads
    assert states < peak < 2 * (states + activations), (peak, states, activations)


# -- host syncs (issue 22): counted by CUDA itself ------------------------------------------------------------------
SYNC_WARNING = "called a synchronizing CUDA operation"


class CudaSyncsPerStep(Callback):
    """From the end of step 1 on, CUDA's sync debug mode warns on every synchronizing operation; each step's count
    is what was caught between the previous step's end and its own (its stop vote included)."""

    def __init__(self, caught: list) -> None:
        self.caught, self.per_step, self._seen = caught, {}, 0

    def on_batch_end(self, logs=None) -> None:
        step = self.engine.state.step
        syncs = sum(SYNC_WARNING in str(w.message) for w in self.caught)
        if step > 1:
            self.per_step[step] = syncs - self._seen
        self._seen = syncs
        if step == 1:
            torch.cuda.set_sync_debug_mode("warn")


@pytest.mark.skipif(not ON_CUDA, reason="CUDA's sync debug mode")
@pytest.mark.parametrize("extra", [
    pytest.param(["--training-optimizer", "muon", "--training-lora-rank", "4"], id="lora-muon"),
    pytest.param([*MOE, "--model-moe-balance", "aux_free"], id="moe-aux-free"),
])
def test_lora_muon_and_aux_free_steps_do_not_sync_the_host(tmp_path, monkeypatch, extra):
    """Between log steps, a step of LoRA + Muon and of aux_free balancing makes no synchronizing CUDA call (the
    padded MoE dispatch: the loop's group sizes are a documented sync of their own)."""
    import warnings

    from llm.training.core.callbacks import build_callbacks
    from llm.training.train import build_engine, prepare_run_dir

    monkeypatch.setenv("LLM_MOE_DISPATCH", "padded")
    args = ["--training-max-steps", "6", "--training-precision", "bf16", "--training-log-interval", "100",
            "--training-val-interval", "0", *extra]
    config, task_class = make_config(tmp_path, *lm_args(tmp_path, *args), base=[])
    prepare_run_dir(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counter = CudaSyncsPerStep(caught)
        engine = build_engine(config, task_class, callbacks=[*build_callbacks(config), counter])
        try:
            engine.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [counter.per_step[s] for s in range(2, 6)] == [0, 0, 0, 0], counter.per_step


@pytest.mark.skipif(not ON_CUDA, reason="CUDA's sync debug mode")
def test_the_stop_vote_does_not_sync_the_host(tmp_path):
    """The multi-process stop vote (`DeferredVote`) on NCCL, under sync debug mode "error": a vote cast at one call
    is every rank's verdict at the next, and no call synchronizes (a one-rank group: one GPU here)."""
    import datetime

    import torch.distributed as dist

    from llm.training.parallel.distributed import DeferredVote, free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
    try:
        vote = DeferredVote(torch.device(DEVICE))
        vote.cast(False)  # the first call allocates the buffers
        work = torch.randn(2048, 2048, device=DEVICE)
        torch.cuda.set_sync_debug_mode("error")
        try:
            verdicts = []
            for flag in (False, True, False, False):
                work = work @ work.T / 2048  # queued work the vote must not wait for
                verdicts.append(vote.cast(flag))
            assert vote.collect() is False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert verdicts == [False, False, True, False]
    finally:
        dist.destroy_process_group()
