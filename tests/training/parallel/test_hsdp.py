"""HSDP (`--distributed-strategy hsdp --distributed-shard-size S`) held to one process, and its refusals (issue 23).

One 4-process gloo launch (the tensor-parallel test's harness) trains, in turn:
- HSDP 2 replicas x 2 shards with full activation checkpointing, 4 steps with a checkpoint at step 2, gradients
  clipped (the norm must count each shard once, not once per replica): every step's loss and gradient norm and the
  final weights equal one process's;
- FSDP over the 4 ranks for 2 steps, whose checkpoint HSDP 2 x 2 resumes for steps 3-4 (DCP reshards 1-D shards onto
  the 2-D mesh);
then this process resumes the HSDP checkpoint alone. Every comparison is to 1e-5 (fp32, AdamW).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY_REGRESSION, call_main

from llm.artifacts.checkpoint import load_shard_metadata
from llm.errors import ConfigError
from llm.training.parallel import distributed as D
from llm.training.parallel.mesh import check_hsdp, resolve_shard_size
from llm.training.train import main
from tests.training.parallel.test_tensor_parallel import COMMON, _by_step, _group, _train, assert_same

CLIP = ["--training-grad-clip", "0.05", "--checkpoint-interval", "2"]  # clipping engages at every step (checked)
HSDP = ["--distributed-strategy", "hsdp", "--distributed-shard-size", "2", "--training-batch-size", "4",
        "--training-activation-checkpointing", "full"]  # recomputing the blocks changes nothing (checked at 1e-5)
FSDP = ["--distributed-strategy", "fsdp", "--training-batch-size", "4"]


def _checkpoint(root: Path, name: str) -> Path:
    return root / name / "run" / "checkpoints" / "step-00000002"


def _job(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    root_path = Path(root)
    _group(rank, 4, port)
    try:
        _train(root_path / "hsdp", [*COMMON, *CLIP, *HSDP], rank, 4)
        _train(root_path / "fsdp", [*COMMON, *CLIP, *FSDP], rank, 4, stop=2)
        _train(root_path / "hsdp-resume", [*COMMON, *CLIP, *HSDP, "--checkpoint-resume",
                                           str(_checkpoint(root_path, "fsdp"))], rank, 4)
    finally:
        D.destroy_process_group()
    (root_path / f"done-{rank}").write_text(json.dumps(rank))


@pytest.mark.slow  # a 4-process job
def test_hsdp_two_by_two_and_its_checkpoint_equal_one_process(tmp_path):
    mp.spawn(_job, args=(D.free_port(), str(tmp_path)), nprocs=4, join=True)
    assert all((tmp_path / f"done-{r}").exists() for r in range(4))
    _train(tmp_path / "one", [*COMMON, *CLIP, "--training-batch-size", "16"], 0, 1)
    _train(tmp_path / "one-resume", [*COMMON, *CLIP, "--training-batch-size", "16", "--checkpoint-resume",
                                     str(_checkpoint(tmp_path, "hsdp"))], 0, 1)
    one = tmp_path / "one" / "run"
    norms = _by_step(one, "train/grad_norm")
    assert len(norms) == 4 and min(norms.values()) > 0.05, norms  # the clip is active: a doubled norm would show
    # fsdp's format; each weight in 2 pieces (the replicas' copies written once), where FSDP over 4 ranks has 4
    for name, pieces in (("hsdp", 2), ("fsdp", 4)):
        meta = load_shard_metadata(_checkpoint(tmp_path, name) / "sharded" / ".metadata").state_dict_metadata
        assert len(meta["model.layers.0.mlp.gate_proj.weight"].chunks) == pieces, name
    assert_same(tmp_path / "hsdp" / "run", one, range(1, 5))
    got = _by_step(tmp_path / "hsdp" / "run", "train/grad_norm")
    assert list(got.values()) == pytest.approx(list(norms.values()), abs=1e-5)
    assert_same(tmp_path / "hsdp-resume" / "run", one, range(3, 5))  # fsdp -> hsdp
    assert_same(tmp_path / "one-resume" / "run", one, range(3, 5))  # hsdp -> one process


def test_shard_size_defaults_to_the_processes_of_one_node():
    assert resolve_shard_size(0, local_world_size=8) == 8
    assert resolve_shard_size(2, local_world_size=8) == 2
    check_hsdp("hsdp", 0, 16, local_world_size=8)  # 2 nodes of 8: 2 replicas x 8 shards
    with pytest.raises(ConfigError, match=r"distributed.shard_size: 8 \(0: the processes of one node\) must divide "
                       "the 12 processes"):
        check_hsdp("hsdp", 0, 12, local_world_size=8)


@pytest.mark.parametrize("flags, words", [
    (["--distributed-strategy", "hsdp"], "distributed.strategy: hsdp needs more than one process"),
    (["--distributed-strategy", "hsdp", "--distributed-shard-size", "3", "--distributed-nproc-per-node", "4"],
     "distributed.shard_size: 3 must divide the 4 processes"),
    (["--distributed-strategy", "hsdp", "--distributed-shard-size", "-1", "--distributed-nproc-per-node", "2"],
     "distributed.shard_size: -1 must be >= 1"),
    (["--distributed-strategy", "fsdp", "--distributed-shard-size", "2", "--distributed-nproc-per-node", "2"],
     "distributed.shard_size: 2 applies to --distributed-strategy hsdp only"),
    (["--distributed-strategy", "hsdp", "--distributed-tensor-parallel", "2", "--distributed-nproc-per-node", "4"],
     "distributed.strategy: hsdp is not combined with --distributed-tensor-parallel 2"),
    (["--distributed-strategy", "hsdp", "--model-use-moe", "--model-num-experts", "2", "--distributed-expert-parallel",
      "2", "--distributed-nproc-per-node", "2"], "distributed.expert_parallel: 2 is not combined with"),
])
def test_an_hsdp_layout_that_cannot_be_is_one_line_naming_the_field(tmp_path, flags, words):
    proc = call_main(main, [*TINY_REGRESSION, "--logging-log-dir", str(tmp_path / "run"), *flags], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # refused before any process starts or anything is written


def test_the_planner_offers_hsdp_across_nodes_with_a_node_sharded_state_and_a_shard_all_reduce_between_nodes(
        tmp_path, monkeypatch):
    from llm.plan import Candidate, candidates, flags, model_shape, predict
    from llm.training.train import parse_config

    shape = model_shape("tiny", 16)
    assert ("hsdp", 1, 4) in {(c.strategy, c.tp, c.shard) for c in candidates(shape, 8, 2, 2)}
    assert "hsdp" not in {c.strategy for c in candidates(shape, 8, 1, 2)}  # one node: that is FSDP
    args = (8, 2, 1 << 40, 16, "fp32", "adamw", 1e9)  # 2 nodes x 4; compute ~0: the step is the communication
    fsdp, hsdp = (predict(shape, Candidate(s, 1, "none", 2, shard), *args) for s, shard in (("fsdp", 0), ("hsdp", 4)))
    assert hsdp.weights == pytest.approx(2 * fsdp.weights)  # sharded 4 ways, not 8
    P = shape.params
    inside = 3 / 4 * P * (2 * 4 + 4) / 300e9  # two fp32 all-gathers and a reduce-scatter over a node's 4 GPUs
    across = 2 * (2 - 1) / 2 * 4 * P / 4 / 40e9  # the all-reduce of a 1/4 fp32 gradient shard over 2 replicas
    assert hsdp.step_s == pytest.approx(inside + across, rel=1e-3)
    assert hsdp.step_s < fsdp.step_s
    printed = flags(hsdp, "tiny", 16, "fp32", "adamw")
    monkeypatch.chdir(tmp_path)
    config, _, _ = parse_config([*printed, "--distributed-nproc-per-node", "8"])  # torchrun's 8 processes, here
    assert (config.distributed.strategy, config.distributed.shard_size) == ("hsdp", 4)
