"""Tensor parallelism (`--distributed-tensor-parallel`) held to one process, and its refusals (issue 23, item 1).

One 4-process gloo launch trains, in turn:
- TP2 x DP2 (DDP), stopped after step 2 with a checkpoint: its steps equal one process's;
- TP2 x FSDP2 with an MoE model (experts replicated over the tensor-parallel group), its step-2 checkpoint written
  asynchronously: 4 steps equal one process's;
- TP2 x DP2 and TP2 x FSDP2 (a 2-D mesh) with Muon: within Muon's bf16 bound of one process;
- TP2 x EP2 with the MoE model (the experts split over the 2 data-parallel ranks of each tensor-parallel coordinate),
  DDP and FSDP, stopped after step 2 (FSDP: with a checkpoint): their steps equal one process's, and each rank holds
  half of the experts;
- TP2 x DP2 with sequence parallelism on the lm task (packed documents, QK-norm, tied embeddings);
- HSDP 2 replicas x 2 shards with full activation checkpointing and a clipped gradient, and FSDP over the 4 ranks
  whose step-2 checkpoint HSDP resumes (the HSDP checkpoint resumes in this process too);
then two of its processes form a new 2-process group, resume the TP2 x DP2 checkpoint with FSDP 2 (DCP reshards the
tensor-parallel DTensors onto FSDP shards), train FSDP2 x EP2 (the MoE model's experts split over the two ranks and
kept out of FSDP's sharding: 4 steps equal one process's), the decoder tasks (lm, sft, dpo) with TP2 and a compiled
TP2 model (`--training-compile`). This process resumes the TP2 x DP2 checkpoint alone, and the TP2 x FSDP2 x EP2 one
(its experts written whole), and trains each of the others in one eager process; all end where one uninterrupted
process ends. Every comparison is to 1e-5 (fp32, AdamW; Muon to its bf16 bound), losses of every step, validation
losses and final weights.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import CKPT, TINY_REGRESSION, call_main, make_config, read_metrics
from safetensors.torch import load_file

from llm.artifacts.checkpoint import load_shard_metadata, load_trainer_state, verify_checkpoint
from llm.export import load_model
from llm.generate import main as generate_main
from llm.models.moe import moe_layers
from llm.training.core.callbacks import Callback
from llm.training.core.engine import TrainingEngine
from llm.training.parallel import distributed as D
from llm.training.parallel.mesh import MeshLayout, build_expert_mesh
from llm.training.train import build_engine, main, prepare_run_dir

COMMON = [*TINY_REGRESSION, *CKPT, "--data-num-samples", "330", "--training-max-steps", "4", "--training-val-interval",
          "2", "--seed", "3", "--training-precision", "fp32", "--training-optimizer", "adamw"]
MOE = ["--model-use-moe", "--model-num-experts", "4", "--model-top-k", "2"]
TP2 = ["--distributed-tensor-parallel", "2"]
EP2 = ["--distributed-expert-parallel", "2"]
MUON = [*COMMON[:-1], "muon"]  # torch's Muon; under TP each matrix is orthogonalised whole (sharded_muon.py)
# Sequence and loss parallelism (--distributed-sequence-parallel) on the lm task: 15-token windows split 8 + 7 over
# the group, packed documents (rotary positions restart per document), QK norms (partial sums over the heads), a
# tied vocabulary-split embedding and head.
SP = ["--distributed-sequence-parallel"]
# HSDP 2 replicas x 2 shards (issue 23), clipped at every step (the norm must count each shard once, not once per
# replica) and with full recompute (which changes nothing: checked at 1e-5); FSDP over the 4 ranks writes the
# checkpoint HSDP resumes (DCP reshards 1-D shards onto the 2-D mesh).
CLIP = ["--training-grad-clip", "0.05", "--checkpoint-interval", "2"]
HSDP = ["--distributed-strategy", "hsdp", "--distributed-shard-size", "2", "--training-batch-size", "4",
        "--training-activation-checkpointing", "full"]
FSDP4 = ["--distributed-strategy", "fsdp", "--training-batch-size", "4"]
TEXT = "".join(f"def f{i}(x):\n    return x * {i % 13} + {i % 7}\n" for i in range(60))


def lm_flags(root: Path) -> list[str]:
    return ["--task", "lm", "--data-path", str(root / "corpus.txt"), "--data-seq-len", "15", "--data-document-mask",
            "--data-val-fraction", "0.2", "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads",
            "4", "--model-num-kv-heads", "2", "--model-qk-norm", "--model-tie-embeddings", "--training-max-steps", "4",
            "--training-val-interval", "2", "--training-val-max-batches", "2", "--seed", "3", "--training-precision",
            "fp32", "--training-optimizer", "adamw", "--training-log-interval", "1", *CKPT]


# The decoder tasks under TP2 (no data parallelism), 2 steps each: their model, loss and collectives (sft's global
# answer-token count, dpo's frozen reference copied from the split policy) equal one process's. The regression task is
# the runs above; classification trains regression's encoder with a cross-entropy (it passed this check once, then was
# left out: its data set's scikit-learn import costs each process about 10 s).
TASK_BASE = ["--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "4", "--training-max-steps",
             "2", "--training-val-interval", "2", "--training-val-max-batches", "1", "--training-log-interval", "1",
             "--training-precision", "fp32", "--training-optimizer", "adamw", "--training-device", "cpu",
             "--training-callbacks", "MetricsLogger", "LRSchedulerCallback", "--seed", "3"]
TASKS = {
    "lm": ["--task", "lm", "--data-seq-len", "32", "--training-batch-size", "4"],
    "sft": ["--task", "sft", "--data-num-samples", "64", "--training-batch-size", "4"],
    "dpo": ["--task", "dpo", "--data-num-samples", "40", "--training-batch-size", "4"],
}
# torch.compile of the split model (aot_eager here, as the compile test of one process: the same graph capture and AOT
# autograd without minutes of C++ code generation; inductor matched eager to 2.4e-7 in a one-off check).
COMPILED = [*TASK_BASE, "--task", "regression", "--data-num-samples", "64", "--data-seq-len", "8",
            "--training-batch-size", "8", "--training-compile"]


class StopAfter(Callback):
    """Stops the run after `step` (the run's end writes its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch_end(self, logs=None) -> None:
        if self.engine.state.step == self.step:
            self.engine.should_stop = True


def _train(out: Path, flags: list[str], rank: int, world: int, stop: int = 0,
           base: list[str] | None = None) -> TrainingEngine:
    config, task = make_config(out, *flags, "--distributed-nproc-per-node", str(world), base=base)
    if rank == 0:
        prepare_run_dir(config)
    if world > 1:
        D.barrier()
    engine = build_engine(config, task, rank, world)
    if stop:
        engine.callbacks.callbacks.append(StopAfter(stop))
    engine.run()
    if world > 1:
        D.barrier()
    return engine


def _group(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    D.init_process_group(rank, world, "gloo", torch.device("cpu"), 1.0)


def _job(rank: int, ports: tuple[int, int], root: str) -> None:
    """Rank `rank` of 4: the TP2 x DP2 and TP2 x FSDP2 (MoE) runs; then ranks 0-1 resume the first with FSDP 2."""
    torch.set_num_threads(1)
    root_path = Path(root)
    _group(rank, 4, ports[0])
    try:
        _train(root_path / "tp2-dp2", [*COMMON, *TP2, "--training-batch-size", "8"], rank, 4, stop=2)
        # Its step-2 checkpoint is written in the background (--checkpoint-async): 2-D DTensor shards, 4 writers.
        _train(root_path / "tp2-fsdp2-moe", [*COMMON, *MOE, *TP2, "--distributed-strategy", "fsdp",
                                             "--training-batch-size", "8", "--checkpoint-async",
                                             "--checkpoint-interval", "2"], rank, 4)
        _train(root_path / "tp2-dp2-muon", [*MUON, *TP2, "--training-batch-size", "8"], rank, 4)
        _train(root_path / "tp2-fsdp2-muon", [*MUON, *TP2, "--distributed-strategy", "fsdp", "--training-batch-size",
                                              "8"], rank, 4)
        for name, strategy in (("tp2-ep2-moe", "ddp"), ("tp2-fsdp2-ep2-moe", "fsdp")):
            engine = _train(root_path / name, [*COMMON, *MOE, *TP2, *EP2, "--distributed-strategy", strategy,
                                               "--training-batch-size", "8"], rank, 4, stop=2)
            experts = moe_layers(engine.unwrapped_model)[0].w_gate_up
            assert experts.shape[0] == 4 and experts.to_local().shape[0] == 2  # whole to readers, half held here
        engine = _train(root_path / "tp2-dp2-sp", [*lm_flags(root_path), *TP2, *SP, "--training-batch-size", "4",
                                                   "--data-cache-dir", str(root_path / f"cache-{rank}")], rank, 4)
        model = engine.unwrapped_model  # the layout it trained with: sequence-sharded norms, a vocabulary-split head
        assert engine.plan.sequence_parallel and model.lm_head.weight is model.embed_tokens.weight
        assert [str(p) for p in (*model.lm_head.weight.placements, *model.norm.weight.placements)] == ["S(0)", "R"]
        _train(root_path / "hsdp", [*COMMON, *CLIP, *HSDP], rank, 4)
        _train(root_path / "fsdp4", [*COMMON, *CLIP, *FSDP4], rank, 4, stop=2)
        _train(root_path / "hsdp-resume", [*COMMON, *CLIP, *HSDP, "--checkpoint-resume",
                                           str(_checkpoint(root_path, "fsdp4"))], rank, 4)
    finally:
        D.destroy_process_group()
    if rank < 2:
        _group(rank, 2, ports[1])
        try:
            _train(root_path / "fsdp2-resume", [*COMMON, "--distributed-strategy", "fsdp", "--training-batch-size", "8",
                                                "--checkpoint-resume", str(_checkpoint(root_path))], rank, 2)
            for name, flags in TASKS.items():
                _train(root_path / f"tp2-{name}", [*TASK_BASE, *flags, *TP2], rank, 2, base=[])
            os.environ["LLM_COMPILE_BACKEND"] = "aot_eager"
            engine = _train(root_path / "tp2-compiled", [*COMPILED, *TP2], rank, 2, base=[])
            (root_path / f"compiled-{rank}").write_text(json.dumps(hasattr(engine.model, "_orig_mod")))
            _train(root_path / "fsdp2-ep2-moe", [*COMMON, *MOE, *EP2, "--distributed-strategy", "fsdp",
                                                 "--training-batch-size", "8"], rank, 2)
        finally:
            D.destroy_process_group()
    (root_path / f"done-{rank}").write_text(json.dumps(rank))


def _greedy(run_dir: Path) -> str:
    out = io.StringIO()
    args = ["--checkpoint", str(run_dir), "--prompt", "def f", "--temperature", "0", "--max-new-tokens", "12"]
    assert generate_main(args, out=out) == 0
    return out.getvalue()




def _checkpoint(root: Path, run: str = "tp2-dp2") -> Path:
    return root / run / "run" / "checkpoints" / "step-00000002"


def _by_step(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def assert_same(run_dir: Path, ref_dir: Path, steps: range, weights: bool = True, tol: float = 1e-5) -> None:
    for key in ("train/loss", "val/loss"):
        got, want = _by_step(run_dir, key), _by_step(ref_dir, key)
        want = {s: v for s, v in want.items() if s in steps}
        assert got.keys() == want.keys() and got, (key, got, want)
        assert list(got.values()) == pytest.approx(list(want.values()), abs=tol), (run_dir.name, key)
    if weights:
        got, want = load_file(run_dir / "model.safetensors"), load_file(ref_dir / "model.safetensors")
        assert got.keys() == want.keys()
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        assert worst < tol, f"{run_dir.parent.name}: final weights differ by {worst}"


@pytest.mark.slow  # a 4-process job
def test_tensor_parallel_runs_and_their_checkpoint_equal_one_process(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    mp.spawn(_job, args=((D.free_port(), D.free_port()), str(tmp_path)), nprocs=4, join=True)
    assert all((tmp_path / f"done-{r}").exists() for r in range(4))
    for name, flags in (("dense", COMMON), ("moe", [*COMMON, *MOE]), ("muon", MUON)):  # one process, batch 16
        _train(tmp_path / name, [*flags, "--training-batch-size", "16"], 0, 1)
    _train(tmp_path / "one-resume", [*COMMON, "--training-batch-size", "16", "--checkpoint-resume",
                                     str(_checkpoint(tmp_path))], 0, 1)
    _train(tmp_path / "moe-resume", [*COMMON, *MOE, "--training-batch-size", "16", "--checkpoint-resume",
                                     str(_checkpoint(tmp_path, "tp2-fsdp2-ep2-moe"))], 0, 1)
    dense = tmp_path / "dense" / "run"
    # The TP checkpoint is the sharded (DCP) format, whole tensors' names, readable on any layout.
    assert (_checkpoint(tmp_path) / "sharded" / ".metadata").is_file()
    assert_same(tmp_path / "tp2-dp2" / "run", dense, range(1, 3), weights=False)
    assert_same(tmp_path / "tp2-fsdp2-moe" / "run", tmp_path / "moe" / "run", range(1, 5))
    written = verify_checkpoint(tmp_path / "tp2-fsdp2-moe" / "run" / "checkpoints" / "step-00000002")["files"]
    assert {"sharded/.metadata", *(f"trainer_state_rank{r}.pt" for r in range(4))} <= set(written)
    for name in ("tp2-ep2-moe", "tp2-fsdp2-ep2-moe"):
        assert_same(tmp_path / name / "run", tmp_path / "moe" / "run", range(1, 3), weights=False)
    assert_same(tmp_path / "moe-resume" / "run", tmp_path / "moe" / "run", range(3, 5))
    assert_same(tmp_path / "fsdp2-ep2-moe" / "run", tmp_path / "moe" / "run", range(1, 5))
    # Muon orthogonalises in bf16, so split sums reach it rounded differently: the bound DDP + Muon has to one
    # process (docs/scale-out.md; measured for 4 steps here: DDP 2 differs by 1.1e-3 in weights and 9e-6 in loss,
    # TP 2 by 1.8e-3 and 4.6e-5).
    assert_same(tmp_path / "tp2-dp2-muon" / "run", tmp_path / "muon" / "run", range(1, 5), tol=5e-3)
    # The 2-D mesh: FSDP shards of tensor-parallel splits, each matrix gathered whole for its owner's Newton-Schulz.
    assert_same(tmp_path / "tp2-fsdp2-muon" / "run", tmp_path / "muon" / "run", range(1, 5), tol=5e-3)
    for resumed in ("fsdp2-resume", "one-resume"):
        assert_same(tmp_path / resumed / "run", dense, range(3, 5))
    for name, flags in TASKS.items():
        _train(tmp_path / name, [*TASK_BASE, *flags], 0, 1, base=[])
        assert_same(tmp_path / f"tp2-{name}" / "run", tmp_path / name / "run", range(1, 3))
    # The compiled TP2 run (its forward really went through torch.compile on both ranks) equals one eager process.
    assert all(json.loads((tmp_path / f"compiled-{rank}").read_text()) for rank in range(2))
    _train(tmp_path / "eager", COMPILED[:-1], 0, 1, base=[])
    assert_same(tmp_path / "tp2-compiled" / "run", tmp_path / "eager" / "run", range(1, 3))
    _train(tmp_path / "lm-sp", [*lm_flags(tmp_path), "--training-batch-size", "8"], 0, 1)
    assert_same(tmp_path / "tp2-dp2-sp" / "run", tmp_path / "lm-sp" / "run", range(1, 5))
    # Its run directory holds whole weights: it generates (KV cache) and exports as one process's does.
    assert _greedy(tmp_path / "tp2-dp2-sp" / "run") == _greedy(tmp_path / "lm-sp" / "run")
    exported = load_model(tmp_path / "tp2-dp2-sp" / "run").state_dict()
    assert set(exported) == set(load_model(tmp_path / "lm-sp" / "run").state_dict())
    # A TP group's batch counts once: the data-parallel degree of 2 at 8 samples per step is the global 16.
    state = load_trainer_state(_checkpoint(tmp_path) / "trainer_state_rank3.pt")
    assert state["state"]["samples_seen"] == 2 * 16
    _check_hsdp(tmp_path)


def _check_hsdp(tmp_path: Path) -> None:
    """HSDP 2 x 2's steps, clipped norms and weights equal one process's; FSDP -> HSDP and HSDP -> one process
    resumes continue it."""
    _train(tmp_path / "one-clip", [*COMMON, *CLIP, "--training-batch-size", "16"], 0, 1)
    _train(tmp_path / "one-clip-resume", [*COMMON, *CLIP, "--training-batch-size", "16", "--checkpoint-resume",
                                          str(_checkpoint(tmp_path, "hsdp"))], 0, 1)
    one = tmp_path / "one-clip" / "run"
    norms = _by_step(one, "train/grad_norm")
    assert len(norms) == 4 and min(norms.values()) > 0.05, norms  # the clip is active: a doubled norm would show
    # fsdp's format; each HSDP weight in 2 pieces (the replicas' copies written once), where FSDP over 4 has 4
    for name, pieces in (("hsdp", 2), ("fsdp4", 4)):
        meta = load_shard_metadata(_checkpoint(tmp_path, name) / "sharded" / ".metadata").state_dict_metadata
        assert len(meta["model.layers.0.mlp.gate_proj.weight"].chunks) == pieces, name
    assert_same(tmp_path / "hsdp" / "run", one, range(1, 5))
    got = _by_step(tmp_path / "hsdp" / "run", "train/grad_norm")
    assert list(got.values()) == pytest.approx(list(norms.values()), abs=1e-5)
    assert_same(tmp_path / "hsdp-resume" / "run", one, range(3, 5))  # fsdp -> hsdp
    assert_same(tmp_path / "one-clip-resume" / "run", one, range(3, 5))  # hsdp -> one process


def test_the_mesh_puts_a_tensor_parallel_group_on_consecutive_ranks():
    layout = MeshLayout(world_size=8, tensor_parallel=2)
    assert layout.data_parallel == 4
    assert [layout.data_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [layout.tensor_rank(r) for r in range(8)] == [0, 1] * 4


def test_the_expert_mesh_splits_experts_over_dp_ranks_of_one_tensor_parallel_coordinate():
    """TP2 x EP2 on 8 ranks, seen from rank 5 (dp 2, tp 1): it exchanges tokens with rank 7 (dp 3, same tp
    coordinate) and sums its expert gradients with rank 1 only (the same experts: dp 0, same tp coordinate)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=5, world_size=8)
    try:
        mesh = build_expert_mesh(MeshLayout(world_size=8, tensor_parallel=2), 2, torch.device("cpu"))
        assert mesh["ep"].mesh.tolist() == [5, 7] and mesh.get_local_rank("ep") == 0
        assert mesh["ep_replicate"].mesh.tolist() == [1, 5] and mesh["tp"].mesh.tolist() == [4, 5]
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("flags, other", [
    (["--model-num-heads", "4", "--distributed-tensor-parallel", "3", "--distributed-nproc-per-node", "3"],
     "--model-num-heads"),
    (["--model-num-kv-heads", "1", *TP2, "--distributed-nproc-per-node", "2"], "--model-num-kv-heads"),
    (["--model-intermediate-size", "33", *TP2, "--distributed-nproc-per-node", "2"], "--model-intermediate-size"),
    ([*TP2, "--distributed-nproc-per-node", "3"], "--distributed-nproc-per-node"),
    ([*MOE, *EP2, *TP2, "--distributed-nproc-per-node", "6"], "--distributed-expert-parallel"),  # dp 3
    (["--model-dropout", "0.1", *TP2, "--distributed-nproc-per-node", "2"], "--model-dropout"),
    (["--training-lora-rank", "4", *TP2, "--distributed-nproc-per-node", "2"], "--training-lora-rank"),
    ([*SP, "--distributed-nproc-per-node", "2"], "--distributed-sequence-parallel"),  # T = 1: nothing to split
    ([*SP, *TP2, "--distributed-nproc-per-node", "2"], "--task regression"),  # its loss takes whole outputs
    (["--task", "lm", *MOE, *EP2, *TP2, *SP, "--distributed-nproc-per-node", "4"], "--distributed-expert-parallel 2"),
])
def test_a_composition_tensor_parallelism_cannot_take_is_one_line_naming_both_flags(tmp_path, flags, other):
    proc = call_main(main, [*TINY_REGRESSION, "--logging-log-dir", str(tmp_path / "run"), *flags], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "--distributed-tensor-parallel" in lines[0] and other in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # refused before any process starts or anything is written
