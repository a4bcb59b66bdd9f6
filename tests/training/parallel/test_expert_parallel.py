"""Expert parallelism and global-batch balancing of one MoE layer, held to the same layer in one process.

Two gloo processes each take half of a batch; with the experts split over them (all-to-all dispatch) and the
balance statistics summed over both, outputs, losses and gradients equal one process running the whole batch.
The end-to-end runs (2 processes vs 1, resume on another degree) are in tests/training/test_scale_out.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm.errors import ConfigError
from llm.models import DecoderModel, active_parameters, flops_per_token, hooks, num_parameters
from llm.models.config import ModelConfig
from llm.models.moe import MoELayer, routing_metrics
from llm.models.moe.parallel import ExpertParallel
from llm.training.parallel import distributed as D
from llm.training.parallel.expert import check_expert_parallel

H, E, K, INTER, N = 16, 4, 2, 8, 12  # hidden, experts, top-k, expert width, tokens of the whole batch


def _layer(skew: bool) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(H, E, K, INTER, dispatch="loop")
    if skew:  # every token picks experts 0 and 1: the second rank's experts receive nothing
        with torch.no_grad():
            layer.gate.weight[2:] = -5.0 * layer.gate.weight[:2].abs().sum(0)
            layer.gate.weight[:2] = layer.gate.weight[:2].abs()
    return layer


def _loss(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    return layer(x).square().mean() + layer.aux_loss


def _check_rank(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for skew in (False, True):
            x = torch.randn(N, H, generator=torch.Generator().manual_seed(1)) + (2.0 if skew else 0.0)
            x = x.abs() if skew else x
            ref = _layer(skew)
            ref_loss = _loss(ref, x)
            ref_loss.backward()

            layer = _layer(skew)
            plan = hooks.shard_experts(layer, 2, rank, 2)
            assert isinstance(plan, ExpertParallel) and plan.expert_parameter_names(layer) == ["w_gate_up", "w_down"]
            hooks.set_data_parallel_group(layer, dist.group.WORLD)
            mine = x[rank * N // 2:(rank + 1) * N // 2]
            out = layer(mine)
            torch.testing.assert_close(out, ref(mine), rtol=0, atol=1e-6)
            _loss(layer, mine).backward()
            plan.finish_gradients()
            dist.all_reduce(layer.gate.weight.grad)  # what DDP does for the router: the mean over ranks
            layer.gate.weight.grad /= 2
            first = rank * E // 2
            for name in ("w_gate_up", "w_down"):
                torch.testing.assert_close(getattr(layer, name).grad, getattr(ref, name).grad[first:first + E // 2],
                                           rtol=0, atol=1e-6)
            torch.testing.assert_close(layer.gate.weight.grad, ref.gate.weight.grad, rtol=0, atol=1e-6)
            if skew and rank == 1:
                assert not layer.w_gate_up.grad.any()  # received no rows, took part, got a zero gradient
            with plan.full_experts():
                torch.testing.assert_close(layer.w_gate_up.data, ref.w_gate_up.data)
            assert layer.w_gate_up.shape[0] == E // 2

        # The whole model's parameters and FLOPs per token on every rank, as in one process (MFU is not halved).
        model = DecoderModel.tiny(use_moe=True)
        one_process = (num_parameters(model), active_parameters(model), flops_per_token(model, 16))
        hooks.shard_experts(model, 2, rank, 2)
        assert model.layers[0].mlp.w_gate_up.shape[0] == model.layers[0].mlp.num_experts // 2
        assert (num_parameters(model), active_parameters(model), flops_per_token(model, 16)) == one_process
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_expert_parallel_ranks_equal_one_process():
    mp.spawn(_check_rank, args=(D.free_port(),), nprocs=2, join=True)


def test_global_balance_spans_the_step_micro_batches():
    """Inside an open step, micro-batch m's balance fractions count micro-batches 1..m; outside one, its own."""
    layer = _layer(False)
    x1, x2 = torch.randn(6, H), torch.randn(6, H)
    hooks.begin_step(layer)
    layer(x1)
    first = layer.tokens_per_expert.clone()
    layer(x2)
    both = first + layer.tokens_per_expert
    probs = layer.route(x2)[0].softmax(-1).mean(0)
    assert layer.balance_loss.item() == pytest.approx(E * (both / both.sum() * probs).sum().item(), rel=1e-6)
    hooks.end_step(layer)
    layer(x2)
    own = layer.tokens_per_expert
    assert layer.balance_loss.item() == pytest.approx(E * (own / own.sum() * probs).sum().item(), rel=1e-6)


def test_aux_free_bias_evens_a_skewed_load_without_gradient():
    torch.manual_seed(0)
    layer = MoELayer(H, E, K, INTER, dispatch="loop", balance="aux_free", bias_update_rate=1e-2)
    w0 = layer.gate.weight[0].detach()
    x = 20 * torch.randn(128, H) + 20 * w0 / w0.norm()  # most tokens prefer expert 0 (1.6x the mean load)
    layer(x)
    skewed = routing_metrics(layer.tokens_per_expert[None])["moe/layer0/max_over_mean"]
    for _ in range(60):
        hooks.begin_step(layer)
        layer(x).sum().backward()
        hooks.end_step(layer)
    assert layer.gate.weight.grad is not None and "routing_bias" in layer.state_dict()
    balanced = routing_metrics(layer.tokens_per_expert[None])["moe/layer0/max_over_mean"]
    assert skewed > 1.5 and balanced < 1.15, (skewed, balanced)
    assert layer.routing_bias.grad is None and layer.aux_loss.item() == pytest.approx(
        layer.z_loss_coef * layer.z_loss.item())  # no balance term in the loss


def test_routing_metrics_per_layer():
    logs = routing_metrics(torch.tensor([[3, 1, 0, 0], [1, 1, 1, 1]]))
    assert logs["moe/layer0/max_over_mean"] == pytest.approx(3.0)
    assert logs["moe/layer1/max_over_mean"] == pytest.approx(1.0)
    assert logs["moe/layer0/expert0"] == pytest.approx(0.75) and logs["moe/layer1/expert3"] == pytest.approx(0.25)


@pytest.mark.parametrize("size, world, fields, strategy, message", [
    (2, 2, {"use_moe": False}, "ddp", "needs an MoE model"),
    (3, 3, {"use_moe": True, "num_experts": 4}, "ddp", "must divide model.num_experts"),
    (2, 3, {"use_moe": True}, "ddp", "must divide the number of processes (3)"),
])
def test_expert_parallel_degree_is_checked(size, world, fields, strategy, message):
    with pytest.raises(ConfigError, match=r"distributed\.expert_parallel") as err:
        check_expert_parallel(size, world, ModelConfig(**fields), strategy)
    assert message in str(err.value)

