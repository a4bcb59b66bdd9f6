"""HSDP against FSDP (issue 23): what crosses the node boundary per step, and Muon's exactness under HSDP.

    python -m benchmarks.bench_hsdp [--hidden 256] [--layers 4] [--steps 3]

Four gloo processes on the CPU stand for 2 nodes x 2 GPUs (ranks 0-1 and 2-3). Each builds one lm-shaped
`DecoderModel` (vocab 256, sequence 128, batch 4 per rank, fp32, the same weights and each rank's own batches in both
runs) and lays it out with the framework's own `parallelize`: FSDP over the 4 ranks, then HSDP with shard size 2
(2 replicas x 2 shards), each with torch's Muon (`build_optimizer`: `ShardedMuon` for the hidden matrices). Every
collective of the last step is recorded (the `torch.distributed` functions FSDP2 and `ShardedMuon` call are wrapped):
its payload bytes (the larger of input and output: an all-gather's output, a reduce-scatter's input) and whether its
process group spans both "nodes". Load-independent: bytes, not seconds. Not counted: `ShardedMuon`'s gather of each
matrix (`DTensor.full_tensor()`, torch's functional collectives), over all 4 ranks under FSDP and over a node's 2
under HSDP.

It also checks what HSDP + Muon claims: the two replicas' shards are bitwise equal after every step (each replica
orthogonalises its own copy), `ShardedMuon`'s owner groups are the replicas' ranks, and the weights stay within Muon's
bf16 bound of FSDP + Muon's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, NODE = 4, 2  # 2 "nodes" of 2 ranks
WRAPPED = ("all_gather_single", "reduce_scatter_single", "all_reduce", "broadcast", "all_gather_into_tensor",
           "reduce_scatter_tensor")


class Recorder:
    """Wraps the collectives in `WRAPPED`; while `on`, adds each call's payload bytes under (name, crosses nodes)."""

    def __init__(self) -> None:
        self.on = False
        self.bytes: dict[str, float] = defaultdict(float)
        for name in WRAPPED:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            if self.on:
                group = kwargs.get("group")
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(WORLD))
                crosses = len({r // NODE for r in ranks}) > 1
                # the larger of input/output: an all-gather's output, a reduce-scatter's input
                size = max(a.numel() * a.element_size() for a in (*args, *kwargs.values())
                           if isinstance(a, torch.Tensor))
                self.bytes[f"{name} {'across nodes' if crosses else 'inside a node'}"] += size
            return fn(*args, **kwargs)

        return call


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    from llm.models.decoder import DecoderModel
    from llm.training.optim.optimizers import build_optimizer
    from llm.training.optim.sharded_muon import ShardedMuon
    from llm.training.parallel.plan import parallelize

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    recorder = Recorder()
    cpu = torch.device("cpu")
    results = {}
    for label, strategy, shard in (("FSDP 4", "fsdp", 0), ("HSDP 2 x 2", "hsdp", 2)):
        torch.manual_seed(0)
        model = DecoderModel(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                             max_seq_len=128)
        params = sum(p.numel() for p in model.parameters())
        model = parallelize(model, strategy, WORLD, cpu, "fp32", shard_size=shard)
        opt_cfg = SimpleNamespace(optimizer="muon", lr=1e-3, muon_lr_scale=8.0, weight_decay=0.1, betas=(0.9, 0.95))
        optimizer = build_optimizer(model, opt_cfg)
        data = torch.Generator().manual_seed(100 + rank)
        for step in range(args.steps):
            recorder.on = step == args.steps - 1
            recorder.bytes.clear()
            tokens = torch.randint(0, 256, (4, 129), generator=data)
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            recorder.on = False
        local = {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
                 for k, v in model.state_dict().items()}
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in model.state_dict().items()}
        muons = [o for o in getattr(optimizer, "optimizers", [optimizer]) if isinstance(o, ShardedMuon)]
        owners = [g.ranks for m in muons for g in m._groups.values()]
        torch.save({"local": local, "full": full}, Path(out) / f"{strategy}-{rank}.pt")
        results[label] = {"bytes": dict(recorder.bytes), "params": params, "owners": owners}
    (Path(out) / f"result-{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from llm.training.parallel.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(free_port(), args, out), nprocs=WORLD, join=True)
        results = [json.loads((Path(out) / f"result-{r}.json").read_text()) for r in range(WORLD)]
        hsdp = [torch.load(Path(out) / f"hsdp-{r}.pt") for r in range(WORLD)]
        fsdp = torch.load(Path(out) / "fsdp-0.pt")
    params = results[0]["FSDP 4"]["params"]
    print(f"DecoderModel hidden {args.hidden}, {args.layers} layers: {params / 1e6:.2f}M parameters "
          f"({4 * params / 2**20:.1f} MiB fp32); payload MiB per rank in step {args.steps} (rank 0), Muon:")
    for label in ("FSDP 4", "HSDP 2 x 2"):
        for key, value in sorted(results[0][label]["bytes"].items()):
            print(f"  {label:10} {key:36} {value / 2**20:8.2f}")
        across = sum(v for k, v in results[0][label]["bytes"].items() if "across" in k)
        print(f"  {label:10} {'total across nodes':36} {across / 2**20:8.2f}")
    same = all(torch.equal(hsdp[a]["local"][k], hsdp[a + NODE]["local"][k])
               for a in range(NODE) for k in hsdp[a]["local"])
    print("HSDP replicas' shards bitwise equal (rank r and r + 2):", same)
    print("ShardedMuon owner groups per rank:", [r["HSDP 2 x 2"]["owners"] for r in results])
    worst = max((hsdp[0]["full"][k] - fsdp["full"][k]).abs().max().item() for k in fsdp["full"])
    print(f"HSDP + Muon vs FSDP + Muon after {args.steps} steps: max weight difference {worst:.2e}")


if __name__ == "__main__":
    main()
