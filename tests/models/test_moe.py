"""MoE layer tests: naive per-token reference (forward and gradients), hand-computed losses, dense limit,
zero-token experts, a 2-process gloo DDP step with one expert starved of tokens, and torch.compile of the paths
that run where grouped_mm cannot (the sync-free padded blocks in one graph; the loop behind a graph break), alone
and through the engine (`LLM_COMPILE_BACKEND=aot_eager`: graph capture and AOT autograd without inductor)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import read_metrics, tiny_engine
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from llm.errors import ConfigError
from llm.models import DecoderModel, MoELayer, hooks
from llm.models.config import ModelConfig
from llm.models.moe import DISPATCH_ENV, moe_layers, routing_metrics
from llm.models.moe.kernels import block_layout, block_rows

DISPATCHES = ["loop", "grouped_mm", "padded"]


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


def test_padded_path_never_reads_tensors_on_the_host(monkeypatch):
    reads = []

    class CountScalarReads(TorchDispatchMode):  # .item(), bool(), int(), float() all dispatch one of these
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    def counting(name: str, original):
        def wrapper(tensor, *args, **kwargs):
            reads.append(name)
            return original(tensor, *args, **kwargs)

        return wrapper

    for name in ("tolist", "numpy"):  # these do not dispatch: count them at the Python level
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    torch.manual_seed(0)
    for dispatch, expected in (("padded", []), ("loop", ["tolist", "tolist"])):  # loop: once per matmul
        layer = MoELayer(8, num_experts=4, top_k=2, intermediate_size=4, dispatch=dispatch)
        x = torch.randn(10, 8)
        reads.clear()
        with CountScalarReads():
            layer(x).sum().backward()
        assert reads == expected, dispatch


@pytest.mark.parametrize("counts", [[5, 0, 3, 9], [17, 0, 0, 0], [0, 0, 0, 1], [4, 4, 4, 4], [1, 2, 3, 40]])
@pytest.mark.parametrize("block", [None, 1, 3, 8])
def test_block_layout_places_every_row_in_a_block_of_its_expert(counts, block):
    counts_t = torch.tensor(counts)
    sorted_experts = torch.repeat_interleave(torch.arange(len(counts)), counts_t)  # (R,)
    rows = sorted_experts.numel()
    layout = block_layout(sorted_experts, counts_t, block)
    B = layout.block
    assert B == (block or block_rows(rows, len(counts)))
    if block is None:  # the default never pads an expert beyond the mean rows per expert
        assert 1 <= B <= max(1, -(-rows // len(counts)))
    assert layout.block_expert.shape == (-(-rows // B) + len(counts),)  # the static bound, whatever the counts
    assert layout.row_of_slot.shape == (layout.block_expert.numel() * B,)
    slots = layout.slot_of_row
    assert slots.unique().numel() == rows and int(slots.max()) < layout.row_of_slot.numel()  # distinct slots
    assert torch.equal(layout.row_of_slot[slots], torch.arange(rows))  # each slot reads back its row
    assert torch.equal(layout.block_expert[slots // B], sorted_experts)  # ... in a block of the row's expert
    # Each expert fills ceil(count / B) blocks, and the used blocks come first.
    blocks = [(slots[sorted_experts == e] // B).unique().numel() for e in range(len(counts))]
    assert blocks == [-(-c // B) for c in counts]
    assert sorted(set((slots // B).tolist())) == list(range(sum(blocks)))


def test_dispatch_env_var_sets_the_default_and_rejects_a_typo(monkeypatch):
    monkeypatch.setenv(DISPATCH_ENV, "padded")
    model = DecoderModel.tiny(use_moe=True)
    assert [m.dispatch for m in moe_layers(model)] == ["padded", "padded"]
    assert MoELayer(8, 2, 1, 4, dispatch="loop").dispatch == "loop"  # an explicit choice wins
    monkeypatch.setenv(DISPATCH_ENV, "paded")
    with pytest.raises(ConfigError, match=f"{DISPATCH_ENV}.*did you mean 'padded'"):
        DecoderModel.tiny(use_moe=True)
    monkeypatch.delenv(DISPATCH_ENV)
    assert MoELayer(8, 2, 1, 4).dispatch == "auto"
    with pytest.raises(ValueError, match="dispatch"):
        MoELayer(8, 2, 1, 4, dispatch="fast")


# ---------------------------------------------------------------------------------------------------- compile
def _grads(model: torch.nn.Module, forward, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = forward(ids)
    (logits.float().logsumexp(-1).mean() + model.aux_loss).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _compiled_matches_eager(dispatch: str, fullgraph: bool, device: str = "cpu") -> int:
    """Compile a tiny MoE decoder (aot_eager), check forward and gradients against eager; returns graph breaks."""
    torch.manual_seed(0)
    model = DecoderModel.tiny(use_moe=True).to(device)
    for layer in moe_layers(model):
        layer.dispatch = dispatch
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    ref, ref_grads = _grads(model, model, ids)
    torch._dynamo.reset()
    counters.clear()
    out, grads = _grads(model, torch.compile(model, backend="aot_eager", fullgraph=fullgraph), ids)
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    return breaks


# fp32 is where grouped_mm cannot run on CUDA (and cannot be traced on a CPU: its fake kernel is bf16-only). The
# padded path compiles as one graph (fullgraph=True fails on any graph break, so no host read is inside); the loop
# compiles too, its host reads behind deliberate graph breaks, and is what "auto" takes on a CPU.
@pytest.mark.slow  # torch.compile (inductor) takes 10-30 s per case on a CPU
@pytest.mark.parametrize(("dispatch", "fullgraph"), [("padded", True), ("padded", False), ("loop", False),
                                                     ("auto", False)])
def test_compiled_fallback_matches_eager_forward_and_grad(dispatch, fullgraph):
    breaks = _compiled_matches_eager(dispatch, fullgraph)
    assert breaks == 0 if dispatch == "padded" else breaks > 0


@pytest.mark.slow  # torch.compile (inductor) takes 10-30 s per case on a CPU
def test_padded_layer_compiles_as_one_graph_with_dynamic_shapes():
    torch.manual_seed(0)
    layer = MoELayer(16, num_experts=4, top_k=2, intermediate_size=8, dispatch="padded")
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)  # token count symbolic
    torch._dynamo.reset()
    for tokens in (37, 300):  # the block size and count derive from the symbolic count, not a guard per value
        x = torch.randn(tokens, 16)
        torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp32_compiles_auto_dispatch_as_one_graph():
    # The failure: fp32 MoE under torch.compile on CUDA, where grouped_mm cannot run.
    assert _compiled_matches_eager("auto", fullgraph=True, device="cuda") == 0


def _engine_losses(run_dir, *args: str) -> tuple[object, list[float]]:
    corpus = run_dir.parent / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(600)))
    engine = tiny_engine(
        run_dir, "--task", "lm", "--data-path", str(corpus), "--data-cache-dir", str(run_dir.parent / "cache"),
        "--data-seq-len", "32", "--model-max-seq-len", "32", "--model-hidden-size", "32", "--model-num-layers", "2",
        "--model-num-heads", "2", "--model-use-moe", "--model-num-experts", "4", "--model-top-k", "2",
        "--training-batch-size", "4", "--training-val-max-batches", "1", "--training-callbacks", "MetricsLogger",
        "--training-max-steps", "3", "--training-log-interval", "1", "--training-precision", "fp32",
        "--training-device", "cpu", *args, base=[], run=True,
    )
    records = [r for r in read_metrics(run_dir / "run") if "train/loss" in r]
    return engine, [r["train/loss"] + r.get("train/aux_loss", 0.0) for r in records]


@pytest.mark.slow  # torch.compile (inductor) takes 10-30 s per case on a CPU
@pytest.mark.parametrize("dispatch", ["padded", "loop"])
def test_engine_compiles_moe_with_the_fallback_forced(tmp_path, monkeypatch, dispatch):
    monkeypatch.setenv("LLM_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv(DISPATCH_ENV, dispatch)
    _, eager = _engine_losses(tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    engine, compiled = _engine_losses(tmp_path / "compiled", "--training-compile")
    assert hasattr(engine.model, "_orig_mod")  # the forward really ran through torch.compile
    assert {m.dispatch for m in moe_layers(engine.unwrapped_model)} == {dispatch}
    breaks = sum(counters["graph_break"].values())
    assert breaks == 0 if dispatch == "padded" else breaks > 0  # padded: the whole model is one graph
    assert len(compiled) == len(eager) == 3
    assert compiled == pytest.approx(eager, rel=1e-5)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------- model hooks
def test_model_hooks_dispatch_to_the_moe_layers_and_are_no_ops_on_a_dense_model():
    torch.manual_seed(0)
    model = DecoderModel.tiny(use_moe=True, num_experts=4, top_k=2)
    layers = moe_layers(model)
    x = torch.randint(0, model.config.vocab_size, (2, 6))
    hooks.begin_step(model)
    model(x)
    assert all(layer._step_counts is not None for layer in layers)  # the step is open in every layer
    torch.testing.assert_close(hooks.aux_loss(model), sum(m.aux_loss for m in moe_layers(model)), rtol=0, atol=0)
    parts = hooks.step_metrics(model)
    assert torch.equal(parts["moe_balance_loss"], torch.stack([m.balance_loss for m in layers]).mean())
    assert torch.equal(parts["moe_z_loss"], torch.stack([m.z_loss for m in layers]).mean())
    hooks.end_step(model, applied=True)
    assert all(layer._step_counts is None for layer in layers)
    counts = torch.stack([m.tokens_per_expert for m in layers])  # one forward: the window is its counts
    reduced = []
    logs = hooks.window_metrics(model, lambda t: reduced.append(t) or t * 2)  # one reduction for all layers
    assert len(reduced) == 1 and logs == routing_metrics(counts * 2)
    assert hooks.window_metrics(model, lambda t: t)["moe/layer0/max_over_mean"] == 0.0  # a fresh window
    hooks.set_data_parallel_group(model, "group")
    assert {layer.balance_group for layer in layers} == {"group"}
    assert [id(p) for p in hooks.router_parameters(model)] == [id(m.gate.weight) for m in layers]

    dense = DecoderModel.tiny()
    hooks.begin_step(dense)
    dense(x)
    hooks.end_step(dense)
    assert hooks.aux_loss(dense) is None and hooks.step_metrics(dense) == {}
    assert hooks.window_metrics(dense, lambda t: pytest.fail("no statistics to reduce")) == {}
    assert hooks.router_parameters(dense) == []


def test_model_config_checks_its_moe_fields():
    ModelConfig().check_moe()
    with pytest.raises(ConfigError, match=r"^model\.moe_balance: invalid value 'globl'; one of global, micro, "
                                          r"aux_free \(did you mean 'global'\?\)"):
        ModelConfig(moe_balance="globl").check_moe()
    with pytest.raises(ConfigError, match=r"^model\.moe_z_loss_coef: invalid value -1\.0; must be >= 0"):
        ModelConfig(moe_z_loss_coef=-1.0).check_moe()


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


@pytest.mark.slow  # a two-process job
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


def test_aux_free_routing_bias_is_saved_and_refused_by_a_mixtral_export():
    """The bias decides routing: it is part of the state (resume), and a Mixtral export, which has nowhere to put
    it, refuses rather than silently routing differently."""
    from llm.models import hf

    model = DecoderModel(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, use_moe=True, num_experts=4,
                         top_k=2, moe_balance="aux_free")
    assert "layers.0.mlp.routing_bias" in model.state_dict()
    assert "layers.0.mlp.routing_bias" not in DecoderModel(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                                           use_moe=True, num_experts=4, top_k=2).state_dict()
    hf._config_to_hf(model)  # an untrained bias (all zero) exports exactly
    model.layers[0].mlp.routing_bias[1] = 0.1
    with pytest.raises(ValueError, match="no routing bias"):
        hf._config_to_hf(model)
