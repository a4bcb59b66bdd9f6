"""Distributed plumbing: backend choice, failure reporting, FSDP helpers (unit tests and one 2-process gloo test)."""

from __future__ import annotations

import datetime
import os
import signal
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, load_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llm.artifacts import consolidate
from llm.artifacts.checkpoint import SHARDED_DIR
from llm.artifacts.sharded import tied_groups, write_safetensors
from llm.errors import ConfigError, UserError
from llm.models.config import ModelConfig
from llm.models.decoder import DecoderModel
from llm.training.parallel import distributed as D
from llm.training.parallel import fsdp
from llm.training.parallel import plan as parallel

GLOO_PEER_ERROR = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:19121. "
    "This is typically caused by a remote worker crashing."
)


def test_backend_follows_the_device_and_rejects_nccl_on_cpu():
    assert D.resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert D.resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert D.resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"
    with pytest.raises(UserError, match="distributed.backend: nccl needs CUDA"):
        D.resolve_backend("nccl", torch.device("cpu"))


def test_single_process_needs_no_group_and_no_wrapper():
    model = torch.nn.Linear(2, 2)
    D.init_process_group(0, 1, "auto", torch.device("cpu"), 1.0)
    assert not D.is_distributed()
    assert parallel.parallelize(model, "fsdp", 1, torch.device("cpu"), "fp32") is model
    assert D.all_reduce_max(3, torch.device("cpu")) == 3
    assert list(fsdp.lockstep_batches(iter([1, 2]), torch.device("cpu"))) == [(1, True), (2, True)]


def test_single_process_plan_leaves_the_model_and_its_state_alone():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    plan = parallel.ParallelPlan(strategy="fsdp", world_size=1)
    assert plan.apply(model) is model and plan.experts is None and not plan.lockstep
    assert list(plan.lockstep_batches(iter([1, 2]))) == [(1, True), (2, True)]
    with plan.full_weights(), plan.no_sync(model, last=False):
        model(torch.randn(4, 3)).square().sum().backward()
    plan.finish_gradients()  # nothing of this layout to finish
    grads = [p.grad.clone() for p in model.parameters()]
    norm = plan.clip_grad_norm(list(model.parameters()), 0.5)
    assert norm == pytest.approx(torch.cat([g.flatten() for g in grads]).norm().item())
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item() == pytest.approx(0.5, rel=1e-4)
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    state = plan.optimizer_state_dict(opt)
    fresh = torch.optim.AdamW(model.parameters())
    plan.load_optimizer_state_dict(fresh, state)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_plan_keeps_the_expert_parallel_checks():
    plan = parallel.ParallelPlan(world_size=2, expert_parallel=2, model_config=ModelConfig(use_moe=False))
    with pytest.raises(ConfigError, match=r"distributed\.expert_parallel: 2 needs an MoE model"):
        plan.apply(torch.nn.Linear(2, 2))


def test_fsdp_units_come_from_the_model():
    model = DecoderModel.tiny()
    assert fsdp.fsdp_units(model) == list(model.layers)
    assert fsdp.fsdp_units(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []  # no method: one unit, the root

    class Stray(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def fsdp_units(self) -> list[torch.nn.Module]:
            return [self.inner, torch.nn.Linear(2, 2)]  # the second is not part of the model

    with pytest.raises(ValueError, match=r"fsdp_units\(\) must return proper submodules, got \['Linear'\]"):
        fsdp.fsdp_units(Stray())


def test_peer_failures_are_told_from_causes():
    assert D.is_peer_failure(RuntimeError(GLOO_PEER_ERROR))
    assert D.is_peer_failure(ConnectionResetError("[Errno 104] Connection reset by peer"))
    assert not D.is_peer_failure(RuntimeError("boom at step 3"))
    assert not D.is_peer_failure(UserError("Connection closed by peer"))  # a user error is always a cause
    assert not D.is_peer_failure(RuntimeError("Timed out waiting 600000ms for recv operation"))  # a hung peer


def _report(exc: BaseException, verdict: str | None, capsys) -> tuple[int, str]:
    if verdict is not None:
        exc.llm_report = verdict
    status = D.report_worker_failure(exc, 1, 2)
    return status, capsys.readouterr().err


def test_one_report_per_job(capsys, monkeypatch):
    try:
        raise RuntimeError("boom at step 3")
    except RuntimeError as exc:
        status, err = _report(exc, "first", capsys)
    assert status == 1 and "Traceback" in err and err.count("RuntimeError: boom") == 1 and err.startswith("[rank 1]")

    status, err = _report(ConfigError("training.lr: invalid value -1"), None, capsys)  # no verdict: report it
    assert (status, err) == (2, "error: training.lr: invalid value -1\n")

    assert _report(ConfigError("training.lr: invalid value -1"), "same", capsys) == (2, "")
    status, err = _report(RuntimeError("disk on fire"), "other", capsys)
    assert status == 1 and err == "error: [rank 1] also failed: RuntimeError: disk on fire\n"

    monkeypatch.setattr(D, "PEER_FAILURE_GRACE_S", 0.0)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    exc = RuntimeError(GLOO_PEER_ERROR)
    D.claim_failure_report(exc, 1)
    status, err = _report(exc, None, capsys)
    assert status == 1 and err.count("\n") == 1 and "lost contact with another process" in err


def test_spawned_cpu_workers_share_the_cores(monkeypatch):
    calls = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    D._share_cpu_threads(4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    D._share_cpu_threads(4)
    assert calls == [2]


def test_tied_weights_are_written_once_and_load_strictly(tmp_path):
    model = DecoderModel.tiny(tie_embeddings=True)
    groups = tied_groups(model)
    assert groups == [["embed_tokens.weight", "lm_head.weight"]]
    state = {k: v.clone() for k, v in model.state_dict().items()}  # unshared copies, as a gathered dict has
    write_safetensors(state, tmp_path / "w.safetensors", groups)
    assert len(load_file(tmp_path / "w.safetensors")) == len(state) - 1
    fresh = DecoderModel.tiny(tie_embeddings=True)
    load_model(fresh, tmp_path / "w.safetensors", strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # a one-process save, on purpose
def test_export_reads_a_sharded_directory_in_one_process(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = DecoderModel.tiny()
    dcp.save({"model": model.state_dict(), "optimizer": {"step": torch.tensor(3)}},
             checkpoint_id=str(tmp_path / "ckpt" / SHARDED_DIR), no_dist=True)
    out = consolidate.export_sharded(tmp_path / "ckpt", tmp_path / "out" / "model.safetensors", verify=False)
    exported = load_file(out)
    assert exported.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="already one safetensors file"):
        consolidate.export_sharded(tmp_path / "out", tmp_path / "x.safetensors", verify=False)
    assert consolidate.main([str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors")]) == 2


# ---------------------------------------------------------------------------------------------
# Two gloo processes
# ---------------------------------------------------------------------------------------------


def _two_rank_checks(rank: int, port: int, out: str) -> None:
    """Runs in each of 2 processes; raises (failing the spawn) on the first wrong result."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        cpu = torch.device("cpu")
        assert D.all_reduce_max(rank + 5, cpu) == 6

        # Validation in lockstep: rank 1 has no batch at all and borrows rank 0's first.
        mine = [torch.full((2,), 10.0 + i) for i in range(3)] if rank == 0 else []
        seen = list(fsdp.lockstep_batches(iter(mine), cpu))
        assert [real for _, real in seen] == ([True] * 3 if rank == 0 else [False] * 3)
        assert torch.equal(seen[0][0], torch.full((2,), 10.0))

        # The first rank to claim a failure reports it; the same error on the other rank stays quiet.
        exc = UserError("training.batch_size: too big")
        D.claim_failure_report(exc, rank)
        verdicts = D.all_gather_object(exc.llm_report)
        assert sorted(verdicts) == ["first", "same"], verdicts

        # FSDP on a tied-embedding decoder: ranks start from rank 0's weights, the full state dict gathers
        # to one ordinary file, and the sharded checkpoint exports to the same weights.
        torch.manual_seed(rank)  # different fresh weights per rank, as the engine's per-rank seeds give
        model = DecoderModel.tiny(tie_embeddings=True)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        model = fsdp.shard_model(model, cpu, "bf16")
        assert fsdp.is_fsdp(model)
        assert all(fsdp.is_fsdp(block) for block in model.layers)  # each of its fsdp_units() sharded on its own
        gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:  # every rank's shard came from rank 0's weights
            assert all(torch.equal(gathered[k], initial[k]) for k in initial)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = model(torch.randint(0, 256, (2, 8))).float().logsumexp(-1).mean()
        loss.backward()
        norm = fsdp.clip_grad_norm([p for p in model.parameters() if p.grad is not None], 1.0)
        assert type(norm) is torch.Tensor and torch.isfinite(norm)
        assert D.all_gather_object(float(norm))[0] == float(norm)
        optimizer.step()
        fsdp.save_full_weights(model, os.path.join(out, "full.safetensors"))
        fsdp.save_sharded(model, optimizer, os.path.join(out, "ckpt", SHARDED_DIR))
        fsdp.load_sharded(model, optimizer, os.path.join(out, "ckpt", SHARDED_DIR))
        D.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a two-process job
def test_two_processes_lockstep_failure_claims_and_fsdp_round_trip(tmp_path):
    mp.spawn(_two_rank_checks, args=(D.free_port(), str(tmp_path)), nprocs=2, join=True)
    full = load_file(tmp_path / "full.safetensors")
    assert "lm_head.weight" not in full or "embed_tokens.weight" not in full  # tied: stored once
    assert all(v.dtype == torch.float32 for v in full.values())  # bf16 compute, fp32 master weights saved
    exported = load_file(consolidate.export_sharded(tmp_path / "ckpt", tmp_path / "exported.safetensors", verify=False))
    assert exported.keys() == full.keys() and all(torch.equal(exported[k], full[k]) for k in full)
    model = DecoderModel.tiny(tie_embeddings=True)
    load_model(model, tmp_path / "exported.safetensors", strict=True)  # loads in one plain process


def test_deferred_vote_is_read_one_call_late_without_a_tensor_read():
    """The stop vote of multi-process runs (a one-rank gloo group here): each call returns the previous call's
    verdict, and no call reads a tensor into Python (the host buffer is read through a numpy view)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    assert D.DeferredVote(torch.device("cpu")).cast(True) is True  # one process: its own flag, at once
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(D.free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        vote = D.DeferredVote(torch.device("cpu"))
        with Reads():
            verdicts = [vote.cast(flag) for flag in (False, True, False, False)]
            last = vote.collect()
        assert verdicts == [False, False, True, False] and last is False
        assert vote.collect() is False  # nothing pending
        assert Reads.count == 0
    finally:
        dist.destroy_process_group()
