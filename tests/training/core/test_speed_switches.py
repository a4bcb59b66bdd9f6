"""Speed switches: compile (dense and MoE), bf16 autocast, activation checkpointing, fused AdamW, and a hot loop
with no host sync between log steps (the deferred non-finite check, which must still refuse and name a bad step).

Compilation uses `LLM_COMPILE_BACKEND=aot_eager` here (graph capture and AOT autograd without inductor's minutes
of C++ code generation on a CPU); the benchmarks and the GPU check run the real inductor switch.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from helpers import TINY_REGRESSION, nan_task, read_metrics, tiny_engine
from torch.utils._python_dispatch import TorchDispatchMode

from llm.artifacts.checkpoint import list_checkpoints
from llm.models.decoder import DecoderModel, TransformerBlock
from llm.training.core.callbacks import Callback
from llm.training.core.engine import NonFiniteLossError, TrainingEngine, compile_backend
from llm.training.tasks.lm_task import LMTask

HAS_CKPT_SWITCH = hasattr(TransformerBlock, "activation_checkpointing")


def lm_args(tmp_path, *extra: str) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(600)]
        corpus.write_text("".join(lines), encoding="utf-8")
    return ["--task", "lm", "--data-path", str(corpus), "--data-cache-dir", str(tmp_path / "cache"),
            "--data-seq-len", "32", "--model-max-seq-len", "32", "--model-hidden-size", "32",
            "--model-num-layers", "2", "--model-num-heads", "2", "--training-batch-size", "4",
            "--training-val-max-batches", "1", "--training-device", "cpu", "--training-callbacks", "MetricsLogger",
            *extra]


def build_engine(tmp_path, args: list[str], task_class=None, extra_callbacks=()) -> TrainingEngine:
    return tiny_engine(tmp_path, *args, base=[], task_class=task_class, extra_callbacks=extra_callbacks)


# -- host syncs ------------------------------------------------------------------------------------
class SyncCounter(TorchDispatchMode):
    """Counts reads of tensor values into Python: `.item()`, `bool()`, `int()`, `float()` (all dispatch
    `_local_scalar_dense` or `is_nonzero`) and `.tolist()`/`.numpy()` (patched: they do not dispatch)."""

    SCALAR_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.count = 0
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SCALAR_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class SyncsPerStep(Callback):
    """Last callback: host syncs of each step (from the previous step's end to this step's end)."""

    def __init__(self, counter: SyncCounter) -> None:
        self.counter, self.per_step, self._last = counter, {}, 0

    def on_batch_end(self, logs=None) -> None:
        self.per_step[self.engine.state.step] = self.counter.count - self._last
        self._last = self.counter.count


def count_syncs(tmp_path, monkeypatch, *args: str) -> dict[int, int]:
    engine = build_engine(tmp_path, lm_args(tmp_path, "--training-max-steps", "6", "--training-log-interval", "100",
                                            "--training-precision", "fp32", *args))
    engine.setup()
    engine.setup = lambda: None  # set-up may sync as it likes; the loop may not
    counter = SyncCounter(monkeypatch)
    recorder = SyncsPerStep(counter)
    recorder.set_engine(engine)
    engine.callbacks.callbacks.append(recorder)
    with counter:
        engine.run()
    return recorder.per_step


def test_no_host_sync_between_log_steps(tmp_path, monkeypatch):
    per_step = count_syncs(tmp_path, monkeypatch)
    # Step 1 starts the epoch: the DataLoader draws its base seed with .item() on a CPU generator tensor.
    assert [per_step[s] for s in range(2, 6)] == [0, 0, 0, 0]
    assert per_step[6] >= 2  # the last step logs: the deferred finite check and the metric transfer


@pytest.mark.parametrize("extra", [
    pytest.param(["--training-optimizer", "muon", "--training-lora-rank", "4"], id="lora-muon"),
    pytest.param(["--model-use-moe", "--model-num-experts", "4", "--model-top-k", "2", "--model-moe-balance",
                  "aux_free"], id="moe-aux-free"),
])
def test_lora_muon_and_aux_free_balancing_sync_only_at_log_steps(tmp_path, monkeypatch, extra):
    """LoRA + Muon (a composite of Muon alone refuses a bad update on the device) and the aux_free routing bias
    (moved without reading the load) add no host sync to a step (issue 22)."""
    per_step = count_syncs(tmp_path, monkeypatch, *extra)
    assert [per_step[s] for s in range(2, 6)] == [0, 0, 0, 0]


def test_skip_policy_pays_one_sync_per_step(tmp_path, monkeypatch):
    # The documented trade-off (and proof that the counter sees the engine's syncs).
    per_step = count_syncs(tmp_path, monkeypatch, "--training-nan-policy", "skip")
    assert all(per_step[s] == 1 for s in range(2, 6))


# -- the deferred non-finite check -----------------------------------------------------------------
NaNAt = nan_task(3)


def regression_args(*extra: str) -> list[str]:
    return [*TINY_REGRESSION, "--training-log-interval", "100", "--training-scheduler-type", "constant", *extra]


def test_deferred_raise_names_the_step_and_applies_no_later_update(tmp_path):
    clean = build_engine(tmp_path / "clean", regression_args("--training-max-steps", "2"))
    clean.run()
    engine = build_engine(tmp_path / "nan", regression_args("--training-max-steps", "6"), task_class=NaNAt)
    with pytest.raises(NonFiniteLossError, match=r"at step 3; the update was not applied \(nor those of steps 4-6"):
        engine.run()
    assert engine.finite.deferred and engine.task.calls == 6  # found at the log step, not at step 3
    for a, b in zip(clean.unwrapped_model.parameters(), engine.unwrapped_model.parameters()):
        assert torch.equal(a, b)  # the weights of step 2: steps 3-6 were all refused
    steps = {int(s["step"]) for s in engine.optimizer.state.values()}
    assert steps == {2}


def test_deferred_check_runs_before_a_checkpoint(tmp_path):
    args = regression_args("--training-max-steps", "8", "--checkpoint-interval", "4", "--training-callbacks",
                           "MetricsLogger", "ModelCheckpoint")
    engine = build_engine(tmp_path, args, task_class=NaNAt)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        engine.run()
    assert engine.state.step == 4  # raised at the checkpoint step, before the checkpoint was written
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_non_fused_optimizer_checks_every_step(tmp_path):
    engine = build_engine(tmp_path, regression_args("--training-max-steps", "6", "--training-optimizer", "sgd"),
                          task_class=NaNAt)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        engine.run()
    assert not engine.finite.deferred and engine.state.step == 2


# -- switches --------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fused_adamw_is_used(tmp_path, optimizer):
    """AdamW is fused, also beside Muon (the lm default), and the non-finite check needs no host sync either way."""
    engine = build_engine(tmp_path, lm_args(tmp_path, "--training-max-steps", "1", "--training-optimizer", optimizer))
    engine.setup()
    adamw = [engine.optimizer] if optimizer == "adamw" else engine.optimizer.optimizers[:1]
    assert all(isinstance(opt, torch.optim.AdamW) for opt in adamw)
    assert all(group["fused"] for opt in adamw for group in opt.param_groups)
    assert engine.finite.deferred


def test_compile_backend_is_inductor_unless_overridden(monkeypatch):
    monkeypatch.delenv("LLM_COMPILE_BACKEND", raising=False)
    assert compile_backend() == "inductor"
    monkeypatch.setenv("LLM_COMPILE_BACKEND", "aot_eager")
    assert compile_backend() == "aot_eager"


def first_losses(tmp_path, *args: str) -> tuple[TrainingEngine, list[float]]:
    engine = build_engine(tmp_path, lm_args(tmp_path, "--training-max-steps", "3", "--training-log-interval", "1",
                                            *args))
    engine.run()
    records = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    return engine, [r["train/loss"] + r.get("train/aux_loss", 0.0) for r in records]


MOE = ["--model-use-moe", "--model-num-experts", "4", "--model-top-k", "2"]


# moe-fp32 guards MoELayer's dispatch under compile: torch's meta kernel of _grouped_mm accepts bf16 only, while
# its CPU kernel also takes fp32, so a compiled fp32 MoE must take the loop path.
@pytest.mark.slow  # torch.compile (inductor) takes 10-20 s per model on a CPU
@pytest.mark.parametrize(
    ("model_args", "precision", "rel"),
    [([], "fp32", 1e-4), (MOE, "bf16", 2e-2), (MOE, "fp32", 1e-4)],
    ids=["dense-fp32", "moe-bf16", "moe-fp32"],
)
def test_compile_runs_and_matches_eager(tmp_path, monkeypatch, model_args, precision, rel):
    monkeypatch.setenv("LLM_COMPILE_BACKEND", "aot_eager")
    args = ["--training-precision", precision, *model_args]
    _, eager = first_losses(tmp_path / "eager", *args)
    engine, compiled = first_losses(tmp_path / "compiled", "--training-compile", *args)
    assert hasattr(engine.model, "_orig_mod")  # the forward really ran through torch.compile
    # Same seed, same data: the compiled model (MoE aux loss included) trains like the eager one.
    assert compiled == pytest.approx(eager, rel=rel)


def test_bf16_autocast_reaches_the_model(tmp_path):
    seen = []

    class Recording(LMTask):
        def train_step(self, batch, model, criterion):
            logits = model(batch[0])
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), logits.dtype))
            return super().train_step(batch, model, criterion)

    engine = build_engine(tmp_path, lm_args(tmp_path, "--training-max-steps", "2", "--training-precision", "bf16"),
                          task_class=Recording)
    engine.run()
    assert seen == [(True, torch.bfloat16, torch.bfloat16)] * 2


@pytest.mark.skipif(not HAS_CKPT_SWITCH, reason="TransformerBlock has no activation_checkpointing switch")
def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        model = DecoderModel.tiny(use_moe=True)
        calls = collections.Counter()
        for block in model.layers:
            block.activation_checkpointing = checkpointing
            block.self_attn.register_forward_pre_hook(lambda *_: calls.update(["attn"]))
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        (model(ids).float().logsumexp(-1).mean() + model.aux_loss).backward()
        return {n: p.grad for n, p in model.named_parameters()}, calls["attn"]

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (2, 4)  # each block's forward ran again in backward
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not HAS_CKPT_SWITCH, reason="TransformerBlock has no activation_checkpointing switch")
def test_engine_switches_activation_checkpointing_on(tmp_path):
    engine = build_engine(tmp_path, lm_args(tmp_path, "--training-max-steps", "2",
                                            "--training-activation-checkpointing"))
    engine.run()
    blocks = [m for m in engine.unwrapped_model.modules() if isinstance(m, TransformerBlock)]
    assert blocks and all(b.activation_checkpointing for b in blocks)
    assert all(r["train/loss"] is not None for r in read_metrics(tmp_path / "run") if "train/loss" in r)


# -- tier 3 ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_compile_loop_has_no_host_sync(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_COMPILE_BACKEND", os.environ.get("LLM_COMPILE_BACKEND", "inductor"))
    per_step = count_syncs(tmp_path, monkeypatch, "--training-device", "cuda", "--training-precision", "bf16",
                           "--training-compile")
    assert [per_step[s] for s in range(2, 6)] == [0, 0, 0, 0]
