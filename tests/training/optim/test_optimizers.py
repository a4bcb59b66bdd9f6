"""Optimizer registry: the muon composite (which parameters go where, exact resume, one schedule for both lrs)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llm.errors import ConfigError
from llm.models.decoder import DecoderModel
from llm.training.optim.composite import CompositeOptimizer
from llm.training.optim.optimizers import build_optimizer, split_muon_params
from llm.training.optim.schedulers import LRSchedule, build_scheduler


def opt_cfg(**overrides) -> SimpleNamespace:
    fields = dict(optimizer="muon", lr=1e-2, betas=[0.9, 0.95], weight_decay=0.1, momentum=0.9, muon_lr_scale=1.0,
                  scheduler_type="cosine", min_lr_ratio=0.1, decay_fraction=0.2, step_size=1, gamma=0.5,
                  plateau_monitor="val/loss", plateau_factor=0.1, plateau_patience=1)
    return SimpleNamespace(**{**fields, **overrides})


def tiny_lm(**overrides) -> DecoderModel:
    torch.manual_seed(0)
    fields = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16)
    return DecoderModel(**{**fields, **overrides})


def names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def lm_loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=g)
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, seeds: range, schedule=None) -> list[float]:
    losses = []
    for seed in seeds:
        loss = lm_loss(model, seed)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step_batch()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------- parameter split
def test_muon_gets_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_lm()
    muon, rest = split_muon_params(model)
    hidden = {n for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2}
    assert names(model, muon) == hidden and len(hidden) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert names(model, rest) == {n for n, _ in model.named_parameters()} - hidden
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= names(model, rest)

    opt = build_optimizer(model, opt_cfg())
    assert isinstance(opt, CompositeOptimizer)
    adamw, muon_opt = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon_opt, torch.optim.Muon)
    # The head decays, embeddings and norms do not; every trainable parameter is in exactly one group.
    decay = {id(p) for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model.lm_head.weight)}
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_moe_router_and_stacked_experts_go_to_adamw():
    model = tiny_lm(use_moe=True, num_experts=4, top_k=2, num_layers=1)
    muon, rest = split_muon_params(model)
    assert names(model, muon) == {f"layers.0.self_attn.{w}.weight" for w in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert {"layers.0.mlp.gate.weight", "layers.0.mlp.w_gate_up", "layers.0.mlp.w_down"} <= names(model, rest)


def test_tied_embeddings_count_once_and_stay_with_adamw():
    model = tiny_lm(tie_embeddings=True)
    muon, rest = split_muon_params(model)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p is model.embed_tokens.weight for p in rest) == 1 and not any(p.ndim != 2 for p in muon)


def test_a_model_without_blocks_keeps_its_input_and_output_layers_on_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 2)))
    muon, rest = split_muon_params(model)
    assert names(model, muon) == {"2.weight"}
    assert "4.0.weight" in names(model, rest) and "0.weight" in names(model, rest)
    with pytest.raises(ConfigError, match="training.optimizer: 'muon' found no 2-D hidden-layer matrices"):
        build_optimizer(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1)), opt_cfg())


# ------------------------------------------------------------------------------------------- schedule and resume
def test_one_schedule_drives_both_lrs_and_the_muon_scale_holds():
    model = tiny_lm()
    cfg = opt_cfg(muon_lr_scale=3.0)
    opt = build_optimizer(model, cfg)
    schedule = LRSchedule(opt, build_scheduler(opt, cfg, total=10), warmup=4)
    peaks = schedule.target_lrs
    assert peaks == [1e-2, 1e-2, 3e-2]  # AdamW decay / no-decay, then Muon at lr * muon_lr_scale
    seen = [[g["lr"] for g in opt.param_groups]]  # before step 1, then after each of 14 steps
    for _ in range(14):
        train_steps(model, opt, range(1), schedule)
        seen.append([g["lr"] for g in opt.param_groups])
    for lrs in seen:  # every group follows the same warmup + cosine, each from its own peak
        assert lrs[0] == lrs[1] and lrs[2] == pytest.approx(3 * lrs[0])
    assert seen[0][0] == pytest.approx(1e-2 / 4) and seen[4][0] == pytest.approx(1e-2)
    assert seen[-1][0] == pytest.approx(1e-3) and seen[-1][2] == pytest.approx(3e-3)  # the cosine's 10% floor
    assert opt.optimizers[1].param_groups[0]["lr"] == seen[-1][2]  # the child's own group, not a copy


def test_state_dict_round_trip_mid_run_continues_bitwise():
    cfg = opt_cfg()
    model = tiny_lm()
    opt = build_optimizer(model, cfg)
    schedule = LRSchedule(opt, build_scheduler(opt, cfg, total=8), warmup=2)
    train_steps(model, opt, range(3), schedule)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": copy.deepcopy(opt.state_dict()),
             "schedule": schedule.state_dict(), "lrs": [g["lr"] for g in opt.param_groups]}
    # The standard flat layout: every parameter's state by index across all groups, Muon's momentum included.
    assert sorted(saved["opt"]["state"]) == list(range(sum(1 for _ in model.parameters())))
    assert "momentum_buffer" in saved["opt"]["state"][len(saved["opt"]["state"]) - 1]
    straight = train_steps(model, opt, range(3, 7), schedule)
    after = {k: v.clone() for k, v in model.state_dict().items()}

    fresh = tiny_lm()
    fresh.load_state_dict(saved["model"])
    opt2 = build_optimizer(fresh, cfg)
    schedule2 = LRSchedule(opt2, build_scheduler(opt2, cfg, total=8), warmup=2)
    opt2.load_state_dict(saved["opt"])
    schedule2.load_state_dict(saved["schedule"])
    assert [g["lr"] for g in opt2.param_groups] == saved["lrs"]
    resumed = train_steps(fresh, opt2, range(3, 7), schedule2)
    assert resumed == straight
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, after[name]), name


def test_grad_scaler_unscales_and_steps_every_child():
    """fp16's path: GradScaler.unscale_ sees all groups through the composite; a power-of-two scale is exact."""
    plain, scaled = tiny_lm(), tiny_lm()
    opt_plain, opt_scaled = build_optimizer(plain, opt_cfg()), build_optimizer(scaled, opt_cfg())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for seed in range(3):
        lm_loss(plain, seed).backward()
        scaler.scale(lm_loss(scaled, seed)).backward()
        scaler.unscale_(opt_scaled)
        for a, b in zip(plain.parameters(), scaled.parameters()):  # Muon's too (clipping reads them next)
            assert torch.equal(a.grad, b.grad)
        opt_plain.step()
        scaler.step(opt_scaled)
        scaler.update()
        opt_plain.zero_grad()
        opt_scaled.zero_grad()
    for (name, a), b in zip(plain.state_dict().items(), scaled.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_state_dict_of_another_layout_is_refused():
    model = tiny_lm()
    adamw_state = torch.optim.AdamW(model.parameters()).state_dict()  # one group
    with pytest.raises(ValueError, match="1 parameter groups and this optimizer 3"):
        build_optimizer(model, opt_cfg()).load_state_dict(adamw_state)


# --------------------------------------------------------------------------------------------------- it trains
def test_muon_trains_a_tiny_lm_through_the_engine(tmp_path):
    from helpers import read_metrics, tiny_engine

    base = ["--task", "lm", "--data-seq-len", "32", "--model-hidden-size", "32", "--model-num-layers", "1",
            "--model-num-heads", "2", "--model-max-seq-len", "32", "--training-batch-size", "8",
            "--training-log-interval", "1", "--training-device", "cpu", "--training-callbacks", "MetricsLogger",
            "--logging-loggers", "jsonl", "--data-max-bytes", "300000", "--training-val-max-batches", "2"]
    engine = tiny_engine(tmp_path, "--training-optimizer", "muon", "--training-max-steps", "30",
                         "--training-lr", "3e-3", "--training-warmup", "5", base=base, run=True)
    assert isinstance(engine.optimizer, CompositeOptimizer)
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert len(losses) == 30 and max(losses[-5:]) < losses[0] - 1.0, losses


@pytest.mark.parametrize("first", [True, False])
def test_composite_refuses_an_update_on_the_device(first):
    """`found_inf` (GradScaler's, or the engine's deferred non-finite check) leaves every parameter and state tensor
    as it was, Muon's included, without a host sync; a zero `found_inf` is an ordinary step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    muon = torch.optim.Muon([model[0].weight], lr=0.02, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([model[0].bias, *model[1].parameters()], lr=1e-3, fused=True)
    opt = CompositeOptimizer([muon, adamw])

    def backward(m: nn.Module) -> None:
        m.zero_grad()
        m(torch.ones(2, 8)).square().sum().backward()

    if not first:
        backward(model)
        opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state]
    backward(model)
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    after = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state]
    for old, new in zip(states, after):
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert all(not v.any() for s in after[len(states):] for v in s.values() if torch.is_tensor(v))  # fresh state
    opt.found_inf = torch.zeros(())
    opt.step()  # the same gradients, now applied
    del opt.found_inf
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt._step_supports_amp_scaling


def test_a_composite_of_muon_alone_refuses_on_the_device():
    """LoRA under Muon leaves AdamW nothing: the composite is Muon alone and still refuses an update without a host
    sync (the engine's deferred non-finite check relies on it)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 8, bias=False)
    opt = CompositeOptimizer([torch.optim.Muon([layer.weight], lr=0.02, adjust_lr_fn="match_rms_adamw")])
    assert opt._step_supports_amp_scaling
    before = layer.weight.detach().clone()
    layer(torch.ones(2, 8)).square().sum().backward()
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert torch.equal(layer.weight, before)
    assert not opt.state[layer.weight]["momentum_buffer"].any()
    opt.step()
    assert not torch.equal(layer.weight, before)
