"""MoE layer tests: naive per-token reference (forward and gradients), hand-computed losses, dense limit,
zero-token experts, and a 2-process gloo DDP step with one expert starved of tokens."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from llm.models import MoELayer

DISPATCHES = ["loop", "grouped_mm"]


def naive_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Loop over tokens and their top-k experts, with the router recomputed from scratch."""
    inter = layer.intermediate_size
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = torch.softmax(x[n].double() @ layer.gate.weight.double().T, dim=-1).float()
        top = torch.topk(probs, layer.top_k)
        gates = top.values / top.values.sum() if layer.norm_topk_prob else top.values
        for g, e in zip(gates, top.indices):
            w = layer.w_gate_up[e]
            h = F.silu(x[n] @ w[:, :inter]) * (x[n] @ w[:, inter:])
            out[n] = out[n] + g * (h @ layer.w_down[e])
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x)
    return out


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("norm_topk", [True, False])
def test_matches_naive_reference_forward_and_grad(dispatch, shared, norm_topk):
    torch.manual_seed(0)
    layer = MoELayer(16, num_experts=6, top_k=2, intermediate_size=8, num_shared_experts=shared,
                     norm_topk_prob=norm_topk, dispatch=dispatch)
    with torch.no_grad():
        layer.gate.weight.mul_(20)  # spread the router so top-k choices are not near-ties
        layer.w_gate_up.mul_(10)
    x = torch.randn(3, 7, 16, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    grads = torch.autograd.grad(out.sum(), [x, *layer.parameters()])

    x_ref = x.detach().clone().requires_grad_()
    ref = naive_moe(layer, x_ref.view(-1, 16)).view_as(x)
    ref_grads = torch.autograd.grad(ref.sum(), [x_ref, *layer.parameters()], allow_unused=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=name)


def test_losses_equal_hand_computed_values():
    E, k = 3, 2
    layer = MoELayer(
        3, num_experts=E, top_k=k, intermediate_size=4, dispatch="loop", aux_loss_coef=0.5, z_loss_coef=0.25
    )
    W = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, -1.0, 1.5]]  # router (E, H)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.tensor(W))
    xs = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    layer(torch.tensor(xs))

    counts = [0] * E
    mean_p = [0.0] * E
    z = 0.0
    for x in xs:
        logits = [sum(W[e][h] * x[h] for h in range(3)) for e in range(E)]
        lse = math.log(sum(math.exp(v) for v in logits))
        z += lse**2 / len(xs)
        for e in range(E):
            mean_p[e] += math.exp(logits[e] - lse) / len(xs)
        for e in sorted(range(E), key=lambda e: -logits[e])[:k]:
            counts[e] += 1
    balance = E * sum(c / (len(xs) * k) * p for c, p in zip(counts, mean_p))
    assert layer.tokens_per_expert.tolist() == counts
    torch.testing.assert_close(layer.aux_loss, torch.tensor(0.5 * balance + 0.25 * z))
    _, _, experts = layer.route(torch.tensor(xs))
    bal, zl = layer.losses(layer.route(torch.tensor(xs))[0], experts, layer.tokens_per_expert)
    assert bal.item() == pytest.approx(balance, rel=1e-6)
    assert zl.item() == pytest.approx(z, rel=1e-6)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_all_experts_with_equal_router_is_dense_mixture(dispatch):
    torch.manual_seed(0)
    E, H, inter = 4, 8, 12
    layer = MoELayer(H, num_experts=E, top_k=E, intermediate_size=inter, dispatch=dispatch)
    with torch.no_grad():
        layer.gate.weight.zero_()
    x = torch.randn(5, H)
    wg, wu = layer.w_gate_up[..., :inter], layer.w_gate_up[..., inter:]
    dense = torch.stack([(F.silu(x @ wg[e]) * (x @ wu[e])) @ layer.w_down[e] for e in range(E)]).mean(0)
    torch.testing.assert_close(layer(x), dense, atol=1e-6, rtol=1e-5)
    assert layer.tokens_per_expert.tolist() == [5] * E
    # uniform router: balance loss is exactly 1, z-loss is log(E)^2
    torch.testing.assert_close(layer.aux_loss, torch.tensor(0.01 * 1.0 + 0.001 * math.log(E) ** 2))


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_starved_expert_gets_zero_gradient(dispatch):
    torch.manual_seed(0)
    layer = MoELayer(8, num_experts=4, top_k=2, intermediate_size=4, dispatch=dispatch)
    x = torch.randn(10, 8) * 0.1
    x[:, 0] = 3.0
    with torch.no_grad():
        layer.gate.weight[2, 0] = -50.0  # expert 2 never wins
    layer(x).square().sum().backward()
    assert layer.tokens_per_expert[2] == 0
    assert layer.w_gate_up.grad is not None and layer.w_down.grad is not None
    assert layer.w_gate_up.grad[2].abs().sum() == 0 and layer.w_gate_up.grad[0].abs().sum() > 0


def test_no_tokens_keeps_parameters_in_graph():
    layer = MoELayer(8, num_experts=4, top_k=2, intermediate_size=4, dispatch="loop")
    out = layer(torch.randn(0, 8))
    assert out.shape == (0, 8)
    out.sum().backward()
    assert layer.w_gate_up.grad is not None and layer.w_down.grad is not None


def test_forced_grouped_mm_with_unaligned_width_raises():
    layer = MoELayer(8, num_experts=2, top_k=1, intermediate_size=6, dispatch="grouped_mm")
    with pytest.raises(RuntimeError, match="16-byte"):
        layer(torch.randn(3, 8))
    layer.dispatch = "auto"  # auto falls back to the loop
    assert layer(torch.randn(3, 8)).shape == (3, 8)


def test_invalid_top_k():
    with pytest.raises(ValueError):
        MoELayer(8, num_experts=2, top_k=3, intermediate_size=4)


# ------------------------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        for dispatch in DISPATCHES:
            torch.manual_seed(0)  # same init on both ranks (DDP also broadcasts it)
            layer = MoELayer(8, num_experts=4, top_k=2, intermediate_size=4, num_shared_experts=1, dispatch=dispatch)
            with torch.no_grad():
                layer.gate.weight[3, 0] = -50.0  # expert 3 is starved on every rank
            model = torch.nn.parallel.DistributedDataParallel(layer)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
            for _ in range(2):  # DDP reports an unreduced parameter on the step after it happened
                x = torch.randn(6, 8, generator=gen) * 0.1
                x[:, 0] = 3.0
                loss = model(x).square().mean() + layer.aux_loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                assert layer.tokens_per_expert[3] == 0
            flat = torch.cat([p.detach().flatten() for p in layer.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(world_size)]
            dist.all_gather(gathered, flat)
            assert torch.equal(gathered[0], gathered[1]), f"ranks diverged with dispatch={dispatch}"
        if rank == 0:
            open(os.path.join(result_dir, "ok"), "w").close()
    finally:
        dist.destroy_process_group()
    # Leave without C++ static destructors, as the framework's workers do: gloo's teardown sometimes aborts a
    # finished process ("terminate called without an active exception"), which spawn reports as a failure.
    os._exit(0)


def test_ddp_step_with_starved_expert_keeps_ranks_in_sync(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "ok").exists()


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_bf16_autocast_runs_experts_in_bf16_with_fp32_grads(dispatch):
    torch.manual_seed(0)
    layer = MoELayer(16, num_experts=4, top_k=2, intermediate_size=8, dispatch=dispatch)
    with torch.no_grad():  # O(1) outputs so the tolerance below means something
        layer.w_gate_up.mul_(20)
        layer.w_down.mul_(20)
    x = torch.randn(12, 16)
    ref = layer(x)
    assert ref.abs().mean() > 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.float32  # the residual stream keeps its dtype
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
    out.sum().backward()
    assert layer.w_gate_up.grad.dtype == torch.float32 and layer.w_gate_up.grad.abs().sum() > 0
