"""Issue 24's recipe levers do what they say: zero-initialised output projections, logit soft-capping (in training
and generation, refused by the exports), torch Muon's own options, Muon on the embeddings, the AdamW side's lr,
and sequence-length warmup (every token still scored, the same rows on resume: bitwise)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import CKPT, make_config, tiny_engine
from safetensors.torch import load_file, save_model

from llm.errors import ConfigError
from llm.export import main as export_main
from llm.models import DecoderModel
from llm.training.core.callbacks import Callback
from llm.training.optim.optimizers import build_optimizer
from llm.training.tasks.lm_task import rows_per_window, split_rows

TINY = dict(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_seq_len=32)
# The lm task on a tiny corpus (written by `corpus`), two layers of width 16.
LM = ["--task", "lm", "--model-hidden-size", "16", "--model-num-layers", "2", "--model-num-heads", "2",
      "--data-seq-len", "16", "--training-batch-size", "2", "--training-log-interval", "1",
      "--training-callbacks", "MetricsLogger", "LRSchedulerCallback", "--training-device", "cpu",
      "--training-precision", "fp32", "--logging-loggers", "jsonl"]


def corpus(tmp_path) -> list[str]:
    path = tmp_path / "corpus.txt"
    path.write_text("def f(x):\n    return x + 1\n\n" * 40)
    return [*LM, "--data-path", str(path), "--data-cache-dir", str(tmp_path / "cache")]


# ----------------------------------------------------------------------------------------------------- model
def test_zero_init_output_starts_each_block_as_the_identity_and_still_trains():
    torch.manual_seed(0)
    plain, zero = DecoderModel(**TINY), DecoderModel(**TINY, zero_init_output=True)
    outputs = [n for n, _ in zero.named_parameters() if n.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(outputs) == 4
    assert all(not zero.get_parameter(n).any() for n in outputs)
    assert all(plain.get_parameter(n).any() for n in outputs)  # off by default
    assert zero.get_parameter("layers.0.mlp.up_proj.weight").any()  # the other matrices keep their init
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():  # identity blocks: logits are the head on the normed embeddings
        torch.testing.assert_close(zero(ids), zero.lm_head(zero.norm(zero.embed_tokens(ids))))
    zero(ids).logsumexp(-1).sum().backward()
    assert zero.get_parameter(outputs[-1]).grad.abs().sum() > 0


def test_logit_softcap_bounds_the_logits_in_training_and_generation():
    torch.manual_seed(0)
    plain = DecoderModel(**TINY)
    capped = DecoderModel(**TINY, logit_softcap=2.0)
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.lm_head.weight.mul_(100)  # logits far beyond the cap
        capped.lm_head.weight.mul_(100)
        ids = torch.randint(0, 64, (1, 6))
        raw, out = plain(ids), capped(ids)
    assert raw.abs().max() > 10 and out.abs().max() <= 2.0
    torch.testing.assert_close(out, 2.0 * torch.tanh(raw / 2.0))
    # Generation reads the capped logits: sampling at temperature 1 follows the flattened distribution.
    prompt = torch.tensor([1, 2, 3])
    a = plain.generate(prompt, 24, temperature=1.0, seed=0)
    b = capped.generate(prompt, 24, temperature=1.0, seed=0)
    assert not torch.equal(a, b)


def test_a_softcapped_model_is_refused_by_the_exports_in_one_line(tmp_path, capsys):
    cfg = {**TINY, "vocab_size": 256, "logit_softcap": 30.0}  # the byte tokenizer's vocabulary
    model = DecoderModel(**cfg)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.yaml").write_text(yaml.safe_dump({"task": "lm", "model": cfg}))
    save_model(model, str(src / "model.safetensors"))
    assert export_main([str(src), "--to", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "logit_softcap=30" in err and not (tmp_path / "out").exists()
    from llm.export_gguf import _hyperparameters

    with pytest.raises(Exception, match="logit_softcap=30"):
        _hyperparameters(model)
    assert DecoderModel(**TINY, zero_init_output=True).config.export_blockers() == []  # init only: exportable


def test_attention_fp32_on_cpu_runs_the_kernel_on_fp32_copies_under_bf16_autocast_only(monkeypatch):
    import llm.models.layers as layers

    torch.manual_seed(0)
    plain = DecoderModel(**TINY)
    upcast = DecoderModel(**TINY, attention_fp32_on_cpu=True)
    upcast.load_state_dict(plain.state_dict())
    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", spy)
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain(x), upcast(x)
    assert seen == [torch.bfloat16] * 2 + [torch.float32] * 2  # two layers each
    assert b.dtype == a.dtype and (a.float() - b.float()).abs().max() < 0.05  # bf16 rounding apart, no more
    with torch.autocast("cpu", dtype=torch.bfloat16):
        upcast(x).float().sum().backward()  # the fp32 copies carry gradients back to the bf16 projections
    assert all(p.grad is not None for p in upcast.parameters())
    seen.clear()
    assert torch.equal(plain(x), upcast(x)) and seen == [torch.float32] * 4  # fp32 already: the same model, bitwise
    assert upcast.config.export_blockers() == []  # numerics only: it exports as the plain model


def test_model_levers_come_from_flags_and_yaml_and_are_checked(tmp_path):
    config, _ = make_config(tmp_path, "--model-logit-softcap", "15", "--model-zero-init-output")
    assert config.model.logit_softcap == 15.0 and config.model.zero_init_output
    yml = tmp_path / "levers.yaml"
    yml.write_text("model:\n  logit_softcap: 20\ntraining:\n  muon_ns_steps: 3\n  decay_shape: sqrt\n")
    config, _ = make_config(tmp_path, "--config", str(yml))
    assert config.model.logit_softcap == 20.0 and config.training.muon_ns_steps == 3
    for flags, field in [(["--model-logit-softcap", "-1"], "model.logit_softcap"),
                         (["--training-decay-shape", "cosine"], "training.decay_shape"),
                         (["--training-muon-ns-coefficients", "1", "2"], "training.muon_ns_coefficients"),
                         (["--training-muon-momentum", "1"], "training.muon_momentum"),
                         (["--training-adamw-lr-scale", "0"], "training.adamw_lr_scale"),
                         (["--training-seq-len-warmup", "5"], "training.seq_len_warmup")]:  # regression: no windows
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            make_config(tmp_path, *flags)


# ------------------------------------------------------------------------------------------------- optimizer
def test_muon_options_reach_torch_muon_and_the_split(tmp_path):
    torch.manual_seed(0)
    model = DecoderModel(**TINY)
    config, _ = make_config(tmp_path, "--training-optimizer", "muon", "--training-muon-momentum", "0.8",
                            "--no-training-muon-nesterov", "--training-muon-ns-steps", "3",
                            "--training-muon-ns-coefficients", "3", "-4", "2", "--training-muon-embeddings",
                            "--training-adamw-lr-scale", "2.5", "--training-weight-decay", "0.1")
    opt = build_optimizer(model, config.training)
    adamw, muon = opt.optimizers
    hidden, tables = muon.param_groups
    assert (hidden["momentum"], hidden["nesterov"], hidden["ns_steps"]) == (0.8, False, 3)
    assert tuple(hidden["ns_coefficients"]) == (3.0, -4.0, 2.0)
    assert [id(p) for p in tables["params"]] == [id(model.embed_tokens.weight)] and tables["weight_decay"] == 0.0
    assert hidden["weight_decay"] == 0.1 and id(model.lm_head.weight) not in {id(p) for p in hidden["params"]}
    t = config.training
    assert all(math.isclose(g["lr"], t.lr * 2.5) for g in adamw.param_groups)
    assert all(math.isclose(g["lr"], t.lr * t.muon_lr_scale) for g in muon.param_groups)
    default = build_optimizer(model, make_config(tmp_path, "--training-optimizer", "muon")[0].training)
    assert len(default.optimizers[1].param_groups) == 1  # embeddings on AdamW, one Muon group: as before
    assert default.optimizers[1].param_groups[0]["ns_steps"] == 5


# ---------------------------------------------------------------------------------------- seq-len warmup
def test_seq_len_warmup_cuts_windows_into_rows_by_the_step_alone():
    assert [rows_per_window(s, 9, 256) for s in range(10)] == [8, 8, 8, 4, 4, 4, 2, 2, 2, 1]
    assert rows_per_window(0, 9, 12) == 4 and rows_per_window(0, 9, 6) == 2  # as many halvings as T allows
    x = torch.arange(2 * 16).reshape(2, 16)
    rows, targets = split_rows((x, x + 1), 4)
    assert rows.shape == (8, 4) and torch.equal(rows.flatten(), x.flatten())  # every token, in order
    assert torch.equal(targets, rows + 1)


class Crash(Callback):
    def on_batch_end(self, logs=None) -> None:
        if self.engine.state.step == 3:
            raise RuntimeError("simulated crash")


def test_seq_len_warmup_runs_bitwise_on_resume_and_changes_the_early_steps(tmp_path):
    base = [*corpus(tmp_path), *CKPT, "--training-max-steps", "6", "--checkpoint-interval", "2",
            "--training-seq-len-warmup", "4", "--training-val-interval", "0"]

    def run(name: str, *extra: str, crash: tuple = ()):
        tiny_engine(tmp_path, *extra, "--logging-log-dir", str(tmp_path / name), base=base, run=True,
                    extra_callbacks=crash)
        return load_file(str(tmp_path / name / "model.safetensors"))

    straight = run("straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("resumed", crash=(Crash(),))  # after step 3; the last checkpoint is step 2, inside the warmup
    resumed = run("resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    off = run("off", "--training-seq-len-warmup", "0")
    assert not all(torch.equal(straight[k], off[k]) for k in straight)  # the lever changed the run
    with pytest.raises(ConfigError, match="odd"):
        make_config(tmp_path, *corpus(tmp_path), "--data-seq-len", "15", "--training-seq-len-warmup", "4", base=[])
