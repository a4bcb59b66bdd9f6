"""Muon under FSDP (issue 23): each sharded matrix is orthogonalised whole, so FSDP + Muon follows DDP + Muon.

One 2-process gloo launch checks several things (each rank writes what it saw; the parent compares):
- the FSDP model's optimizer is a `ShardedMuon` (the DDP one a plain `torch.optim.Muon`), and each rank ran
  Newton-Schulz for only the matrices it owns (round-robin), not for all of them;
- after 5 steps on the same batches, FSDP + Muon's weights equal DDP + Muon's within the stated bound (measured:
  bitwise equal, max abs diff 0.0);
- a sharded checkpoint (DCP, `save_sharded`) written after step 3 and loaded into a fresh FSDP model continues
  steps 4-5 to bitwise the same weights and momentum as the uninterrupted run;
- the same checkpoint loads in one process into a plain model and a plain `torch.optim.Muon` (the layout-independent
  form: sharded momentum becomes whole momentum), equal to the full state the FSDP run gathered;
- matrices sharded by rows (FSDP), by columns (a row-parallel tensor-parallel linear) or replicated, uneven shards
  included, step exactly as torch's Muon on the whole matrices.
A fast in-process test checks that the refusal of FSDP + Muon is gone at config time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm.models.decoder import DecoderModel
from llm.training.optim.optimizers import build_optimizer, describe_optimizer
from llm.training.train import parse_config

# FSDP + Muon vs DDP + Muon, max abs weight diff after 5 steps: exactly 0 (both orthogonalise the same whole matrices
# with the same bf16 Newton-Schulz; 2 ranks' gradient sums round alike under reduce-scatter and all-reduce).
BOUND = 0.0
STEPS, SAVE_AT = 5, 3
CFG = SimpleNamespace(optimizer="muon", lr=1e-3, muon_lr_scale=8.0, weight_decay=0.1, betas=(0.9, 0.95))


def _model() -> DecoderModel:
    torch.manual_seed(0)
    # hidden 32 (rows split 16/16), MLP 48 x 32 and 32 x 48, 2 layers: 14 Muon matrices, some of them tall.
    return DecoderModel.tiny(intermediate_size=48, num_experts=4)


def _batch(step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 256, (2, 16), generator=gen)


def _train(model, optimizer, steps: range, rank: int) -> None:
    for step in steps:
        tokens = _batch(step, rank)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _full_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Whole weights and momentum buffers by name (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True)  # on every rank
    weights, optim = get_state_dict(model, optimizer, options=opts)
    out = {f"w.{k}": v for k, v in weights.items()}
    out.update({f"m.{k}": v["momentum_buffer"] for k, v in optim["state"].items() if "momentum_buffer" in v})
    return out


def _placements_match_plain_muon() -> bool:
    """ShardedMuon over matrices split by rows (FSDP), by columns (a row-parallel TP linear) and replicated equals
    torch's Muon over the whole matrices, bit for bit, over two steps (uneven shards included: 5 rows, 7 columns)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from llm.training.optim.sharded_muon import ShardedMuon

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(7)
    shapes_placements = [((5, 12), Shard(0)), ((8, 7), Shard(1)), ((6, 4), Replicate()), ((12, 5), Shard(0))]
    full = [torch.randn(shape, generator=gen) for shape, _ in shapes_placements]
    grads = [[torch.randn(shape, generator=gen) for shape, _ in shapes_placements] for _ in range(2)]
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [pl]))
               for t, (_, pl) in zip(full, shapes_placements)]
    options = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref, opt = torch.optim.Muon(plain, **options), ShardedMuon(sharded, **options)
    for step in grads:
        for p, q, g, (_, pl) in zip(plain, sharded, step, shapes_placements):
            p.grad, q.grad = g.clone(), distribute_tensor(g.clone(), mesh, [pl])
        ref.step()
        opt.step()
    return all(torch.equal(p.detach(), q.detach().full_tensor()) for p, q in zip(plain, sharded))


def _job(rank: int, world: int, port: int, out: str) -> None:
    from llm.training.optim import sharded_muon
    from llm.training.parallel.fsdp import load_sharded, save_sharded
    from llm.training.parallel.plan import parallelize

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = [0]
    real_ns = sharded_muon._zeropower_via_newtonschulz

    def counted(*args, **kwargs):
        calls[0] += 1
        return real_ns(*args, **kwargs)

    sharded_muon._zeropower_via_newtonschulz = counted
    cpu, result = torch.device("cpu"), {}
    try:
        result["placements"] = _placements_match_plain_muon()
        calls[0] = 0
        ddp = parallelize(_model(), "ddp", world, cpu, "fp32")
        ddp_opt = build_optimizer(ddp.module, CFG)
        _train(ddp, ddp_opt, range(STEPS), rank)
        ddp_state = {f"w.{k}": v for k, v in ddp.module.state_dict().items()}

        fsdp = parallelize(_model(), "fsdp", world, cpu, "fp32")
        opt = build_optimizer(fsdp, CFG)
        result["kinds"] = [type(child).__name__ for child in opt.optimizers]
        result["described"] = describe_optimizer(opt).split(" (")[0]
        result["muon_matrices"] = sum(len(g["params"]) for g in opt.optimizers[-1].param_groups)
        _train(fsdp, opt, range(SAVE_AT), rank)
        result["ns_calls_per_step"] = calls[0] / SAVE_AT
        save_sharded(fsdp, opt, Path(out) / "ckpt")
        _train(fsdp, opt, range(SAVE_AT, STEPS), rank)
        straight = _full_state(fsdp, opt)
        result["fsdp_vs_ddp"] = max((straight[k] - ddp_state[k]).abs().max().item() for k in ddp_state)

        resumed = parallelize(_model(), "fsdp", world, cpu, "fp32")
        resumed_opt = build_optimizer(resumed, CFG)
        load_sharded(resumed, resumed_opt, Path(out) / "ckpt")
        _train(resumed, resumed_opt, range(SAVE_AT, STEPS), rank)
        again = _full_state(resumed, resumed_opt)
        result["resume_keys"] = sorted(again) == sorted(straight)
        result["resume_bitwise"] = all(torch.equal(again[k], straight[k]) for k in straight)
        check = parallelize(_model(), "fsdp", world, cpu, "fp32")  # the whole state at the checkpoint, for the
        check_opt = build_optimizer(check, CFG)  # one-process load in the parent
        load_sharded(check, check_opt, Path(out) / "ckpt")
        at_save = _full_state(check, check_opt)
        if rank == 0:
            torch.save(at_save, Path(out) / "at_save.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (Path(out) / f"result-{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note on loading in one process
def test_fsdp_muon_follows_ddp_muon_and_resumes_bitwise(tmp_path):
    from llm.training.parallel.distributed import free_port
    from llm.training.parallel.fsdp import load_sharded

    mp.start_processes(_job, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["kinds"] == ["AdamW", "ShardedMuon"] and r["described"] == "muon"  # logged as DDP's muon
        assert r["fsdp_vs_ddp"] <= BOUND, r
        assert r["placements"], r
        assert r["resume_keys"] and r["resume_bitwise"], r
    # Owner scheme: each rank orthogonalised its half of the matrices per step, not all of them.
    matrices = results[0]["muon_matrices"]
    assert [r["ns_calls_per_step"] for r in results] == [(matrices + 1) // 2, matrices // 2]

    # One process reads the FSDP checkpoint into a plain model and torch's own Muon: the same whole state.
    model = _model()
    optimizer = build_optimizer(model, CFG)
    assert type(optimizer.optimizers[-1]) is torch.optim.Muon
    load_sharded(model, optimizer, tmp_path / "ckpt")
    expected = torch.load(tmp_path / "at_save.pt")
    state = {f"w.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if "momentum_buffer" in optimizer.state.get(p, {}):
                state[f"m.{names[id(p)]}"] = optimizer.state[p]["momentum_buffer"]
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_fsdp_with_muon_is_accepted_at_config_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, _, _ = parse_config(["--task", "lm", "--distributed-strategy", "fsdp", "--training-precision", "bf16"])
    assert (config.training.optimizer, config.distributed.strategy) == ("muon", "fsdp")
    assert not any(tmp_path.iterdir())
