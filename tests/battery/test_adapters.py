"""Issue 22, kind 4: LoRA adapters are exact.

- Every documented target trains: the attention and MLP projections, the MoE router ``gate`` (README) and an
  untied ``lm_head`` (a linear layer the target error lists): its adapters get gradients and move, the frozen base
  stays bitwise, under AdamW and under Muon (the lm default).
- A target that names nothing, and an adapter on a tied LM head (no tied model could compute it), are one line.
- The merge equals the adapted model: logits within 1e-5 in fp32, tied and untied, for each target; the scale is
  alpha / rank; adapter dropout is off in the merged model; the merged weights keep the base's dtype.
- A checkpoint that holds only the adapters pins its base: a changed base is refused on resume and by the tools that
  merge it (export, load_run), with one line naming the base and both checksums and nothing written; the same base
  is accepted; a checkpoint from before the pin loads with one warning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import call_main
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llm.artifacts import base_pin
from llm.artifacts.checkpoint import MANIFEST, CheckpointError
from llm.artifacts.runs import load_run
from llm.errors import ConfigError
from llm.export import main as export_main
from llm.models import lora
from llm.models.decoder import DecoderModel
from llm.training.core.config import TrainingConfig
from llm.training.optim.optimizers import build_optimizer
from llm.training.train import main as train_main

DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (target, model overrides): every name the docs offer, on a model that has it.
TARGETS = [
    *[(t, {}) for t in DENSE_TARGETS],
    ("gate", {"use_moe": True}),  # the MoE router (README: "the router `gate` can be named as a target")
    ("lm_head", {}),  # untied; a tied one is refused (test_a_tied_lm_head_target_is_one_line)
]


def adapted(target: str, seed: int = 0, dropout: float = 0.0, **overrides) -> DecoderModel:
    torch.manual_seed(seed)
    return lora.apply_lora(DecoderModel.tiny(**overrides), rank=4, alpha=8, dropout=dropout, targets=[target])


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
    aux = getattr(model, "aux_loss", None)
    return loss + aux if aux is not None else loss


def train(model: nn.Module, optimizer: str = "adamw", steps: int = 3) -> dict[str, torch.Tensor]:
    """A few steps of the project's optimizer; returns the adapters' gradients of the last step."""
    opt = build_optimizer(model, TrainingConfig(optimizer=optimizer, lr=1e-2, weight_decay=0.1))
    grads = {}
    for step in range(steps):
        loss_of(model, batch(step)).backward()
        grads = {n: p.grad.clone() for n, p in lora.adapter_parameters(model).items() if p.grad is not None}
        opt.step()
        opt.zero_grad()
    return grads


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    with lora.full_state(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- every target trains
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize(("target", "overrides"), TARGETS, ids=[t for t, _ in TARGETS])
def test_each_documented_target_trains_and_the_base_stays_bitwise(target, overrides, optimizer):
    model = adapted(target, **overrides)
    adapters = lora.adapter_parameters(model)
    assert adapters and all(n.split(".lora_")[0].endswith("." + target) or n.startswith(target + ".")
                            for n in adapters), sorted(adapters)
    before = full_state(model)
    assert all(not before[n].any() for n in adapters if ".lora_B." in n)  # B starts at zero: a no-op adapter
    if optimizer == "muon" and target in ("gate", "lm_head"):
        # Muon orthogonalises hidden matrices only, and these targets leave it none: one line naming the optimizer
        # field (the README says to use adamw for them alone).
        with pytest.raises(ConfigError, match=r"^training.optimizer: 'muon' found no 2-D hidden-layer matrices"):
            train(model, optimizer)
        return
    grads = train(model, optimizer)
    after = full_state(model)
    assert set(grads) == set(adapters), "an adapter got no gradient"
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_A." in n)  # B moved after step 1, so A learns
    assert all(after[n].abs().sum() > 0 for n in adapters if ".lora_B." in n)
    assert all(not torch.equal(after[n], before[n]) for n in adapters)
    frozen = [k for k in before if not lora.is_adapter_key(k)]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)


# ------------------------------------------------------------------------------------- one-line refusals
def test_a_target_that_names_no_layer_is_one_line_naming_it_and_the_names_there_are(tmp_path):
    run = tmp_path / "run"
    result = call_main(train_main, [*TINY_SFT, "--training-lora-rank", "4", "--training-lora-targets", "qkv_proj",
                                    "--training-max-steps", "1", "--logging-log-dir", str(run)], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: training.lora_targets: ['qkv_proj'] name no nn.Linear of DecoderModel")
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj" in lines[0]
    assert not (run / "checkpoints").exists() and not (run / "model.safetensors").exists()


def test_a_tied_lm_head_target_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^training.lora_targets: \['lm_head'\] adapts the LM head, which is tied"):
        adapted("lm_head", tie_embeddings=True)
    run = tmp_path / "run"
    result = call_main(train_main, [*TINY_SFT, "--model-tie-embeddings", "--training-lora-rank", "4",
                                    "--training-lora-targets", "q_proj", "lm_head", "--training-max-steps", "1",
                                    "--logging-log-dir", str(run)], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tied to the input embedding (model.tie_embeddings)" in lines[0], result.stderr
    assert not (run / "checkpoints").exists() and not (run / "model.safetensors").exists()


# ------------------------------------------------------------------------------------- the merge is exact
MERGE_CASES = [(t, o, tie) for tie in (False, True) for t, o in TARGETS if not (tie and t == "lm_head")]


@pytest.mark.parametrize(("target", "overrides", "tie"), MERGE_CASES,
                         ids=[f"{t}-{'tied' if tie else 'untied'}" for t, _, tie in MERGE_CASES])
def test_the_merged_model_computes_what_the_adapted_one_does(target, overrides, tie):
    model = adapted(target, dropout=0.25, tie_embeddings=tie, **overrides)
    train(model)
    merged = lora.merged_model(model.eval()).eval()
    assert not lora.is_adapted(merged) and merged.config.tie_embeddings == tie
    if tie:
        assert merged.lm_head.weight is merged.embed_tokens.weight
    ids = batch(7)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-5, rtol=0)
    # The merged weights hold the base plus B @ A * alpha / rank, nothing else changed.
    plain = dict(merged.state_dict())
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            assert module.scaling["default"] == 8 / 4
            torch.testing.assert_close(plain[f"{name}.weight"], module.base_layer.weight + b @ a * (8 / 4),
                                       atol=1e-6, rtol=0)


def test_adapter_dropout_is_off_in_the_merge_and_on_in_training():
    model = adapted("q_proj", dropout=0.5)
    train(model)
    ids = batch(3)
    merged = lora.merged_model(model)
    assert merged.training  # the copy keeps the mode; its dropout is the model's own (0), not the adapters'
    with torch.no_grad():
        torch.manual_seed(0)
        noisy = model.train()(ids)
        torch.testing.assert_close(merged(ids), model.eval()(ids), atol=1e-5, rtol=0)
        assert (noisy - model(ids)).abs().max() > 1e-4  # dropout does act on the adapters while they train


def test_the_merged_weights_keep_the_base_dtype():
    torch.manual_seed(0)
    model = lora.apply_lora(DecoderModel.tiny().to(torch.bfloat16), rank=4, alpha=8, targets=["q_proj"])
    for p in lora.adapter_parameters(model).values():  # fp32 adapters on a bf16 base
        p.data = torch.randn_like(p, dtype=torch.float32) * 0.1
    state = lora.merged_state_dict(model)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    q = model.layers[0].self_attn.q_proj
    expected = (q.base_layer.weight.float() + q.lora_B["default"].weight @ q.lora_A["default"].weight * 2).bfloat16()
    assert torch.equal(state["layers.0.self_attn.q_proj.weight"], expected)


# ------------------------------------------------------------------------------------- the base checksum
def test_the_base_checksum_is_of_the_tensors_not_their_order_or_files():
    torch.manual_seed(0)
    state = DecoderModel.tiny().state_dict()
    digest = lora.base_sha256(state)
    assert lora.base_sha256(dict(reversed(list(state.items())))) == digest
    assert lora.base_sha256({k: v.clone() for k, v in state.items()}) == digest
    changes = (lambda s: s["norm.weight"].add_(1e-3), lambda s: s.update({"norm.weight": s["norm.weight"].double()}),
               lambda s: s.update({"norm.weight": s["norm.weight"][:-1]}), lambda s: s.pop("norm.weight"))
    for change in changes:  # a value, a dtype, a shape, a tensor
        changed = {k: v.clone() for k, v in state.items()}
        change(changed)
        assert lora.base_sha256(changed) != digest


# The end-to-end runs: a tied base, and LoRA adapters trained on it that checkpoint only themselves.
TINY_SFT = [
    "--task", "sft", "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "4",
    "--data-num-samples", "64", "--training-batch-size", "8", "--training-lr", "3e-3", "--training-warmup", "0",
    "--training-precision", "fp32", "--training-device", "cpu", "--training-log-interval", "5",
    "--training-val-max-batches", "1", "--training-callbacks", "LRSchedulerCallback", "--logging-loggers", "jsonl",
]


def lora_args(base: Path, steps: int = 4) -> list[str]:
    return [*TINY_SFT, "--model-init-from", str(base), "--training-lora-rank", "4", "--training-lora-alpha", "8",
            "--training-max-steps", str(steps), "--checkpoint-interval", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(base run, LoRA run on it: checkpoints at steps 2 and 4, the merged final weights)."""
    root = tmp_path_factory.mktemp("adapters")
    base, run = root / "base", root / "lora"
    for args in ([*TINY_SFT, "--model-tie-embeddings", "--training-max-steps", "1", "--logging-log-dir", str(base)],
                 [*lora_args(base), "--logging-log-dir", str(run)]):
        result = call_main(train_main, args, root)  # leaves the "llm" logger as it was (no handler of the run's)
        assert result.returncode == 0, result.stderr
    return base, run


def change_base(base: Path) -> bytes:
    """Change one value of the base run's final weights (keeping the file's metadata); returns the old bytes."""
    path = base / "model.safetensors"
    old = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    state["norm.weight"] = state["norm.weight"] + 1e-3
    save_file(state, str(path), metadata=metadata)
    return old


@pytest.fixture
def changed_base(runs):
    base, _ = runs
    old = change_base(base)
    yield base
    (base / "model.safetensors").write_bytes(old)


def one_error_line(result, logs: bool = False) -> str:
    """The one ``error: ...`` line of a refusal (exit status 2, no traceback); ``logs``: a training run, whose
    start-up log lines come before it."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and [i for i, x in enumerate(lines) if "error" in x] == [len(lines) - 1]
    assert lines[-1].startswith("error: ") and (logs or len(lines) == 1), result.stderr
    return lines[-1]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name not in ("train.log", ".lock")}


def test_an_adapters_only_checkpoint_records_its_base(runs):
    base, run = runs
    step = run / "checkpoints" / "step-00000004"
    assert all(lora.is_adapter_key(k) for k in load_file(step / "model.safetensors"))
    recorded = json.loads((step / MANIFEST).read_text())[base_pin.MANIFEST_KEY]
    source = load_file(base / "model.safetensors")  # tied: one name stored, the other filled as the load does
    tied = source.get("embed_tokens.weight", source.get("lm_head.weight"))
    source.setdefault("embed_tokens.weight", tied)
    source.setdefault("lm_head.weight", tied)
    assert recorded == {"path": str(base), "sha256": lora.base_sha256(source)}


def test_the_run_s_merged_weights_compute_what_its_adapters_on_the_base_do(runs):
    base, run = runs
    final = load_run(run, tokenizer=False).model  # the run's model.safetensors: merged, tied, plain
    assert final.config.tie_embeddings and final.lm_head.weight is final.embed_tokens.weight
    assert set(load_file(run / "model.safetensors")) == set(final.state_dict()) - {"lm_head.weight"}
    model = lora.apply_lora(load_run(base, tokenizer=False).model.train(), rank=4, alpha=8, targets=DENSE_TARGETS,
                            adapters_only=True)
    model.load_state_dict(load_file(run / "checkpoints" / "step-00000004" / "model.safetensors"), strict=True)
    ids = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(final(ids), model.eval()(ids), atol=1e-5, rtol=0)


def test_a_changed_base_is_refused_on_resume_and_nothing_is_written(runs, changed_base, tmp_path):
    _, run = runs
    copy = tmp_path / "lora"
    shutil.copytree(run, copy)
    before = tree_bytes(copy)
    result = call_main(train_main, [*lora_args(changed_base, steps=6), "--logging-log-dir", str(copy)], tmp_path)
    line = one_error_line(result, logs=True)
    recorded = json.loads((run / "checkpoints" / "step-00000004" / MANIFEST).read_text())["lora_base"]["sha256"]
    assert f"trained on the base {changed_base} (sha256 {recorded})" in line
    assert f"model.init_from {changed_base} now holds other weights (sha256 " in line
    assert tree_bytes(copy) == before


def test_the_same_base_resumes(runs, tmp_path):
    base, run = runs
    copy = tmp_path / "lora"
    shutil.copytree(run, copy)
    result = call_main(train_main, [*lora_args(base, steps=6), "--logging-log-dir", str(copy)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in (copy / "train.log").read_text()
    assert (copy / "checkpoints" / "step-00000006" / MANIFEST).is_file()


def test_a_moved_but_equal_base_resumes(runs, tmp_path):
    base, run = runs
    moved = tmp_path / "elsewhere"
    shutil.copytree(base, moved)
    copy = tmp_path / "lora"
    shutil.copytree(run, copy)
    result = call_main(train_main, [*lora_args(moved, steps=6), "--logging-log-dir", str(copy)], tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_changed_base_is_refused_by_export_and_nothing_is_written(runs, changed_base, tmp_path):
    _, run = runs
    out = tmp_path / "hf"
    result = call_main(export_main, [str(run / "checkpoints" / "step-00000004"), "--to", "hf", str(out)], tmp_path)
    line = one_error_line(result)
    assert f"trained on the base {changed_base} (sha256 " in line and "now holds other weights" in line
    assert not out.exists()
    with pytest.raises(CheckpointError, match="holds LoRA adapters trained on the base"):
        load_run(run / "checkpoints" / "step-00000002", tokenizer=False)


def test_the_same_base_exports_the_run_s_merged_model(runs, tmp_path):
    _, run = runs
    out = tmp_path / "hf"
    result = call_main(export_main, [str(run / "checkpoints" / "step-00000004"), "--to", "hf", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr
    from llm.models.hf import load_hf

    exported, final = load_hf(out), load_run(run, tokenizer=False).model
    ids = batch(6)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(ids), final(ids), atol=1e-5, rtol=0)


def test_a_checkpoint_from_before_the_pin_loads_with_one_warning(runs, tmp_path):
    _, run = runs
    step = tmp_path / "step-00000004"
    shutil.copytree(run / "checkpoints" / "step-00000004", step)
    manifest = json.loads((step / MANIFEST).read_text())
    del manifest[base_pin.MANIFEST_KEY]
    (step / MANIFEST).write_text(json.dumps(manifest))
    warnings: list[str] = []
    model = load_run(step, tokenizer=False, warn=warnings.append).model
    assert len(warnings) == 1 and "records no checksum of that base" in warnings[0] and "unchecked" in warnings[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 load_run(run, tokenizer=False).model.state_dict().values()))


def test_a_checkpoint_from_before_the_pin_resumes_with_one_warning(runs, tmp_path):
    base, run = runs
    copy = tmp_path / "lora"
    shutil.copytree(run, copy)
    manifest_path = copy / "checkpoints" / "step-00000004" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest[base_pin.MANIFEST_KEY]
    manifest_path.write_text(json.dumps(manifest))
    result = call_main(train_main, [*lora_args(base, steps=6), "--logging-log-dir", str(copy)], tmp_path)
    assert result.returncode == 0, result.stderr
    log = (copy / "train.log").read_text()
    assert log.count("records no checksum of that base") == 1 and "resumed from" in log
    assert base_pin.MANIFEST_KEY in json.loads((copy / "checkpoints" / "step-00000006" / MANIFEST).read_text())


def test_a_malformed_base_record_is_one_line(runs, tmp_path):
    _, run = runs
    step = tmp_path / "step-00000004"
    shutil.copytree(run / "checkpoints" / "step-00000004", step)
    manifest = json.loads((step / MANIFEST).read_text())
    manifest[base_pin.MANIFEST_KEY] = {"path": "x", "sha256": "not hex"}
    (step / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"'lora_base' is not \{\"path\": str, \"sha256\": 64 hex digits\}$"):
        load_run(step, tokenizer=False)


def evaluate(source: Path, tmp_path: Path):
    from llm.evaluate import main as evaluate_main

    text = tmp_path / "text.txt"
    text.write_text("Adapters are deltas to one set of weights.\n" * 40)
    return call_main(evaluate_main, [str(source), "--data-path", str(text), "--data-seq-len", "16",
                                     "--training-device", "cpu", "--json"], tmp_path)


def test_evaluate_scores_an_adapters_checkpoint_as_the_run_s_merged_model(runs, tmp_path):
    _, run = runs
    of_checkpoint = evaluate(run / "checkpoints" / "step-00000004", tmp_path)
    of_run = evaluate(run, tmp_path)
    assert of_checkpoint.returncode == 0 and of_run.returncode == 0, of_checkpoint.stderr + of_run.stderr
    a, b = json.loads(of_checkpoint.stdout), json.loads(of_run.stdout)
    assert a["tokens"] == b["tokens"] > 0 and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_init_from_an_adapters_checkpoint_starts_from_its_merged_model(runs):
    from llm.artifacts.runs import read_init_source

    _, run = runs
    state = read_init_source(run / "checkpoints" / "step-00000004").read_weights()
    final = load_file(run / "model.safetensors")  # the run's merged weights (tied: the embedding stored once)
    assert not any(lora.is_adapter_key(k) or ".base_layer." in k for k in state)
    assert set(final) <= set(state) and all(torch.allclose(state[k], final[k], atol=1e-6, rtol=0) for k in final)


def test_a_changed_base_is_refused_by_evaluate(runs, changed_base, tmp_path):
    _, run = runs
    line = one_error_line(evaluate(run / "checkpoints" / "step-00000004", tmp_path))
    assert f"trained on the base {changed_base} (sha256 " in line and "now holds other weights" in line
