"""HSDP (`--distributed-strategy hsdp --distributed-shard-size S`) held to one process, and its refusals (issue 23).

The training runs (HSDP 2 replicas x 2 shards = one process, FSDP -> HSDP and HSDP -> one process resumes) share the
tensor-parallel test's 4-process launch (tests/training/parallel/test_tensor_parallel.py, `_check_hsdp`): one launch
instead of two. Here: the shard size's default, the layouts refused in one line, and the planner's HSDP.
"""

from __future__ import annotations

import pytest
from helpers import TINY_REGRESSION, call_main

from llm.errors import ConfigError
from llm.training.parallel.mesh import check_hsdp, resolve_shard_size
from llm.training.train import main


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
