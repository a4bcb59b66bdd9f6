"""The `sft` task: padding, token-weighted validation metrics, learning the demo set, LoRA through the engine."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import read_metrics
from safetensors.torch import load_file

from llm.data.sft import IGNORE_INDEX, SFTDataModule, render, render_prompt, to_example
from llm.data.tokenizers import ByteTokenizer
from llm.errors import ConfigError
from llm.models.decoder import DecoderModel
from llm.training.core.config import Config, validate_config
from llm.training.observers.metrics import MetricAccumulator
from llm.training.tasks.sft_task import SFTTask
from llm.training.train import main as train_main

TINY_SFT = [
    "--task", "sft", "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "4",
    "--data-num-samples", "256", "--training-batch-size", "8", "--training-warmup", "5", "--training-lr", "3e-3",
    "--training-precision", "fp32", "--training-device", "cpu", "--training-log-interval", "5",
    "--training-callbacks", "LRSchedulerCallback", "--logging-loggers", "jsonl",
]


def tiny_task(tmp_path) -> tuple[SFTTask, SFTDataModule, DecoderModel]:
    config = Config(task="sft")
    config.data.num_samples, config.data.val_fraction, config.data.seq_len = 96, 0.25, 160
    m = config.model
    m.hidden_size, m.num_layers, m.num_heads, m.max_seq_len = 32, 1, 4, 160
    config.training.batch_size, config.logging.log_dir = 5, str(tmp_path / "run")
    SFTTask.validate_config(config)
    task = SFTTask(config)
    dm = task.build_data_module()
    dm.setup()
    torch.manual_seed(0)
    return task, dm, task.build_model()


def test_right_padding_leaves_each_example_its_own_logits():
    torch.manual_seed(0)
    model = DecoderModel.tiny().eval()
    tok = ByteTokenizer()
    examples = [to_example(*render([("user", q), ("assistant", a)], tok), 200) for q, a in
                (("What is 1 + 1?", "2"), ("Reverse 'stone'.", "enots"))]
    from llm.data.sft import PadCollate

    input_ids, labels = PadCollate(0)(examples)
    with torch.no_grad():
        batched = model(input_ids)
        for row, (ids, _) in enumerate(examples):
            alone = model(torch.as_tensor(ids)[None])[0]
            torch.testing.assert_close(batched[row, : len(ids)], alone, atol=1e-5, rtol=0)
    assert (labels[1, len(examples[1][0]):] == IGNORE_INDEX).all()


def test_validation_loss_and_accuracy_are_token_weighted_over_the_split(tmp_path):
    task, dm, model = tiny_task(tmp_path)
    criterion, meter = task.build_criterion(), MetricAccumulator()
    nll = tokens = correct = 0.0
    model.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():  # 24 examples in batches of 5: the last batch is smaller
            loss, metrics = task.validation_step(batch, model, criterion)
            meter.add({**metrics, "loss": loss}, weight=batch[0].shape[0])  # as the engine weighs them
            logits, labels = model(batch[0]), batch[1]
            answer = labels != IGNORE_INDEX
            nll += torch.nn.functional.cross_entropy(logits[answer], labels[answer], reduction="sum").item()
            correct += (logits.argmax(-1)[answer] == labels[answer]).sum().item()
            tokens += answer.sum().item()
    reduced = task.reduce_metrics(meter.compute(torch.device("cpu"), reduce=False), "val")
    assert set(reduced) == {"loss", "accuracy", "ppl"}
    assert reduced["loss"] == pytest.approx(nll / tokens, rel=1e-6)
    assert reduced["accuracy"] == pytest.approx(correct / tokens, abs=1e-9)
    assert reduced["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)


def test_bpe_is_refused_and_the_vocabulary_follows_the_tokenizer():
    config = Config(task="sft")
    config.data.tokenizer = "bpe"
    with pytest.raises(ConfigError, match="data.tokenizer: sft does not train a BPE tokenizer"):
        SFTTask.validate_config(config)
    config.data.tokenizer = "byte"
    SFTTask.validate_config(config)
    config.model.vocab_size = 4096  # a larger vocabulary set by the user is kept (spare rows)
    assert SFTTask.resolved_values(config)["model.vocab_size"] == 4096
    config.model.vocab_size = 256
    assert SFTTask.resolved_values(config)["model.vocab_size"] == 256


def test_lora_fields_are_validated():
    config = Config(task="sft")
    config.training.lora_rank, config.training.lora_dropout = 4, 1.0
    with pytest.raises(ConfigError, match=r"training.lora_dropout: invalid value 1.0"):
        validate_config(config, check_names=False)
    config.training.lora_dropout, config.distributed.strategy = 0.0, "fsdp"
    validate_config(config, check_names=False)  # LoRA runs under FSDP too (issue 21)
    config.training.lora_variant = "qlora"
    with pytest.raises(ConfigError, match=r"training.lora_variant: invalid value 'qlora'"):
        validate_config(config, check_names=False)


def test_sft_run_learns_the_demo_answers(tmp_path):
    run = tmp_path / "run"
    assert train_main([*TINY_SFT, "--training-max-steps", "30", "--training-val-interval", "10",
                       "--logging-log-dir", str(run)]) == 0
    val = [r for r in read_metrics(run) if "val/loss" in r]
    assert [r["step"] for r in val] == [10, 20, 30]
    first, last = val[0], val[-1]
    assert last["val/loss"] < first["val/loss"] - 0.5 and last["val/accuracy"] > first["val/accuracy"]
    assert first["val/loss"] < math.log(256) + 0.5  # the answer-token loss, which starts near uniform


def test_lora_run_freezes_the_base_and_resumes_exactly(tmp_path):
    args = [*TINY_SFT, "--training-lora-rank", "4", "--training-lora-alpha", "8", "--training-max-steps", "12",
            "--checkpoint-interval", "6", "--training-val-max-batches", "1"]
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "a")]) == 0
    ckpts = tmp_path / "a" / "checkpoints"
    mid, end = load_file(ckpts / "step-00000006" / "model.safetensors"), load_file(ckpts / "step-00000012" /
                                                                                    "model.safetensors")
    base = [k for k in end if "lora_" not in k]
    adapters = [k for k in end if "lora_B" in k]
    assert any(".base_layer." in k for k in base) and adapters
    assert all(torch.equal(mid[k], end[k]) for k in base)  # frozen: bitwise the same at every step
    assert not all(torch.equal(mid[k], end[k]) for k in adapters)
    resume = ckpts / "step-00000006"
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "b"), "--checkpoint-resume", str(resume)]) == 0
    again = load_file(tmp_path / "b" / "checkpoints" / "step-00000012" / "model.safetensors")
    assert again.keys() == end.keys() and all(torch.equal(again[k], end[k]) for k in end)


def test_final_weights_of_a_lora_run_are_the_merged_plain_model(tmp_path):
    from llm.artifacts.runs import load_run

    run = tmp_path / "run"
    assert train_main([*TINY_SFT, "--training-lora-rank", "4", "--training-max-steps", "6",
                       "--training-val-max-batches", "1", "--logging-log-dir", str(run)]) == 0
    final = load_file(run / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in final)
    loaded = load_run(run).model  # a plain DecoderModel: generate/export/evaluate need no peft
    ckpt = load_file(run / "checkpoints" / "step-00000006" / "model.safetensors")
    q = "layers.0.self_attn.q_proj"
    delta = ckpt[f"{q}.lora_B.default.weight"] @ ckpt[f"{q}.lora_A.default.weight"] * (16.0 / 4)
    torch.testing.assert_close(loaded.layers[0].self_attn.q_proj.weight, ckpt[f"{q}.base_layer.weight"] + delta)
    prompt = render_prompt([("user", "What is 2 + 2?")], ByteTokenizer())
    assert loaded.generate(torch.tensor(prompt), 4, temperature=0.0).shape[0] == len(prompt) + 4
    # A checkpoint directory of the run (tools take those too): its base and adapters, merged the same way.
    from_ckpt = load_run(run / "checkpoints" / "step-00000006").model
    assert all(torch.equal(a, b) for a, b in zip(from_ckpt.state_dict().values(), loaded.state_dict().values()))


def test_lora_on_an_init_from_base_checkpoints_only_the_adapters_and_resumes_exactly(tmp_path):
    base_args = [*TINY_SFT, "--training-max-steps", "2", "--training-val-max-batches", "1"]
    assert train_main([*base_args, "--logging-log-dir", str(tmp_path / "base")]) == 0
    args = [*TINY_SFT, "--model-init-from", str(tmp_path / "base"), "--training-lora-rank", "4",
            "--training-max-steps", "8", "--checkpoint-interval", "4", "--training-val-max-batches", "1"]
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "a")]) == 0
    ckpts = tmp_path / "a" / "checkpoints"
    end = load_file(ckpts / "step-00000008" / "model.safetensors")
    assert end and all("lora_" in k for k in end)  # the base is rebuilt from model.init_from on resume
    resume = ckpts / "step-00000004"
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "b"), "--checkpoint-resume", str(resume)]) == 0
    again = load_file(tmp_path / "b" / "checkpoints" / "step-00000008" / "model.safetensors")
    assert again.keys() == end.keys() and all(torch.equal(again[k], end[k]) for k in end)
    # Tools rebuild the base from model.init_from and merge the adapters: the run's own final weights.
    from llm.artifacts.runs import load_run

    merged = load_run(ckpts / "step-00000008").model.state_dict()
    final = load_file(tmp_path / "a" / "model.safetensors")
    assert merged.keys() == final.keys() and all(torch.allclose(merged[k], final[k], atol=1e-6) for k in final)
