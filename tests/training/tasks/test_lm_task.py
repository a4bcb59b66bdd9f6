"""The `lm` task: vocabulary resolution, loss and metrics, overfitting, the TextSampler, and CLI errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llm.config import replace_values
from llm.errors import ConfigError
from llm.training.core.config import Config
from llm.training.tasks.lm_task import LMTask, TextSampler, resolve_model_vocab
from llm.training.train import main as train_main

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow.\n"
)


pytestmark = pytest.mark.usefixtures("own_cache")  # each test its own token cache (tmp_path/cache)


def tiny_config(tmp_path, text=TEXT * 4, **training) -> Config:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    config = Config(task="lm")
    config.data.path, config.data.seq_len, config.data.val_fraction = str(corpus), 32, 0.2
    m = config.model
    m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size, m.max_seq_len = 64, 2, 4, 128, 64
    config.training.batch_size = training.pop("batch_size", 4)
    config.training.lr = training.pop("lr", 1e-2)
    config.training.device = "cpu"  # the tests compare with CPU tensors
    return config


TINY_CLI = [
    "--task", "lm", "--data-seq-len", "32", "--data-val-fraction", "0.2",
    "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "2", "--model-max-seq-len", "64",
    "--training-batch-size", "4", "--training-precision", "fp32", "--training-log-interval", "5",
    "--training-device", "cpu",
]


# ------------------------------------------------------------------------------------------------------ vocabulary
def test_vocab_follows_the_tokenizer_unless_set():
    assert resolve_model_vocab(256, 4096) == 4096  # the dataclass default follows the tokenizer
    assert resolve_model_vocab(4160, 4096) == 4160  # a larger, user-set size pads the embedding
    with pytest.raises(ConfigError, match="tokenizer/vocab mismatch"):
        resolve_model_vocab(1000, 4096)
    assert resolve_model_vocab(32000, 256, follow=32000) == 256  # a preset's vocabulary follows the tokenizer too
    assert resolve_model_vocab(512, 256, follow=32000) == 512


# --------------------------------------------------------------------------------------- derived model defaults
def cli_model(*args):
    from llm.training.train import parse_config

    config = parse_config(["--task", "lm", "--training-device", "cpu", *args])[0]
    with torch.device("meta"):
        return config, LMTask(config).build_model()


def test_default_model_is_the_tuned_one_and_widening_derives_the_mlp():
    config, model = cli_model()
    assert model.num_parameters() == 857_216 and model.config.intermediate_size == 344  # README, RESULTS.md
    assert config.model.intermediate_size is None  # derived, not pinned: the saved config rebuilds it as well
    _, wide = cli_model("--model-hidden-size", "768")
    assert wide.config.intermediate_size == 2048  # SwiGLU 8/3 x 768, not the 344 tuned for hidden 128
    _, set_width = cli_model("--model-hidden-size", "768", "--model-intermediate-size", "1024")
    assert set_width.config.intermediate_size == 1024


def test_context_covers_the_window_unless_the_user_set_it(tmp_path):
    config, _ = cli_model("--data-seq-len", "2048")
    assert config.model.max_seq_len == 2048
    assert cli_model("--data-seq-len", "128")[0].model.max_seq_len == 256  # raised, never lowered
    with pytest.raises(ConfigError, match=r"data.seq_len: invalid value 2048; must be <= model.max_seq_len=1024"):
        cli_model("--data-seq-len", "2048", "--model-max-seq-len", "1024")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  max_seq_len: 512\n")
    with pytest.raises(ConfigError, match="model.max_seq_len=512"):
        cli_model("--config", str(cfg), "--data-seq-len", "1024")  # set in the YAML: not raised either


def test_regression_context_covers_its_window_and_summary_token():
    from llm.training.train import parse_config

    config = parse_config(["--task", "regression", "--data-seq-len", "100"])[0]
    assert config.model.max_seq_len == 101
    assert parse_config(["--task", "regression"])[0].model.max_seq_len == 64  # the tuned default, unchanged


def test_resolution_decides_vocab_and_validation_rejects_bad_values(tmp_path):
    config = Config(task="lm")
    config.data.tokenizer = "bpe"
    assert LMTask.resolved_values(config) == {"model.vocab_size": config.data.vocab_size}
    assert config.model.vocab_size == Config().model.vocab_size  # read, not written: the resolution applies it
    config = Config(task="lm")
    config.model.vocab_size = 100
    with pytest.raises(ConfigError, match=r"^model.vocab_size: tokenizer/vocab mismatch"):
        LMTask.resolved_values(config)
    config = Config(task="lm")
    config.data.sampling = "shuffled"
    with pytest.raises(ConfigError, match="data.sampling"):
        LMTask.validate_config(config)
    config = Config(task="lm")
    config.data.seq_len, config.model.max_seq_len = 512, 256
    with pytest.raises(ConfigError, match="data.seq_len"):
        LMTask.validate_config(config)


# ------------------------------------------------------------------------------------------------- loss and metrics
def build(config):
    task = LMTask(config)
    dm = task.build_data_module()
    dm.prepare_data()
    dm.setup()
    torch.manual_seed(0)
    return task, dm, task.build_model(), task.build_criterion()


def test_metrics_are_consistent_with_the_loss(tmp_path):
    task, dm, model, criterion = build(tiny_config(tmp_path))
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        loss, metrics = task.validation_step(batch, model, criterion)
    assert loss.item() == pytest.approx(math.log(256), rel=0.05)  # an untrained model is near uniform
    assert metrics == {}  # bpb and perplexity are derived from the reduced mean loss, not averaged per batch
    derived = task.reduce_metrics({"loss": loss.item()}, "val")
    assert derived["bpb"] == pytest.approx(loss.item() / math.log(2))  # bytes: 1 token per byte
    assert derived["ppl"] == pytest.approx(math.exp(loss.item()), rel=1e-6)
    assert set(task.reduce_metrics({"loss": loss.item()}, "train")) == {"loss", "bpb"}


def test_perplexity_is_exp_of_the_mean_loss_not_a_mean_of_perplexities(tmp_path):
    task, *_ = build(tiny_config(tmp_path))
    losses = [1.0, 3.0]  # two equal-size batches: the engine's reduced mean loss is 2.0
    derived = task.reduce_metrics({"loss": sum(losses) / 2}, "val")
    assert derived["ppl"] == pytest.approx(math.exp(2.0))
    assert derived["ppl"] < sum(math.exp(x) for x in losses) / 2


def test_bpb_uses_the_tokens_per_byte_of_the_split(tmp_path):
    config = tiny_config(tmp_path, text=TEXT * 12)
    config.data.tokenizer, config.data.vocab_size = "bpe", 300
    config = replace_values(config, LMTask.resolved_values(config))  # what the resolution does
    task, dm, model, criterion = build(config)
    # The vocabulary is decided with the config (data.vocab_size); a BPE stopping short leaves spare rows.
    assert model.embed_tokens.num_embeddings == 300 >= dm.tokenizer.vocab_size
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        loss, _ = task.validation_step(batch, model, criterion)
    assert dm.val_tokens_per_byte < 0.7
    bpb = task.reduce_metrics({"loss": loss.item()}, "val")["bpb"]
    assert bpb == pytest.approx(loss.item() / math.log(2) * dm.val_tokens_per_byte)


def test_tiny_model_overfits_a_tiny_corpus(tmp_path):
    config = tiny_config(tmp_path, batch_size=8)
    config.data.sampling = "sequential"
    task, dm, model, criterion = build(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = next(iter(dm.train_dataloader()))
    losses = []
    for _ in range(150):
        loss, _ = task.train_step(batch, model, criterion)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if losses[-1] < 0.05:
            break
    assert losses[0] > 4.0 and losses[-1] < 0.05, (losses[0], losses[-1], len(losses))


def test_moe_model_trains_through_the_task(tmp_path):
    config = tiny_config(tmp_path)
    config.model.use_moe, config.model.num_experts, config.model.top_k = True, 4, 2
    task, dm, model, criterion = build(config)
    loss, _ = task.train_step(next(iter(dm.train_dataloader())), model, criterion)
    loss.backward()
    assert model.aux_loss is not None and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------- through CLI
def test_training_run_logs_bpb_and_samples(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 6, encoding="utf-8")
    run = tmp_path / "run"
    args = [*TINY_CLI, "--data-path", str(corpus), "--training-max-steps", "10", "--training-val-interval", "5",
            "--training-callbacks", "MetricsLogger", "TextSampler", "--logging-log-dir", str(run)]
    assert train_main(args) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/loss" in r]
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in val] == [5, 10] and [r["step"] for r in samples] == [5, 10]
    assert val[-1]["val/bpb"] == pytest.approx(val[-1]["val/loss"] / math.log(2))
    assert all(s["text"].startswith(s["prompt"]) and len(s["text"]) > len(s["prompt"]) for s in samples[-1]["samples"])
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()


def test_preset_run_logs_what_it_overrode(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 6, encoding="utf-8")
    run = tmp_path / "run"
    args = ["--task", "lm", "--model-preset", "tiny", "--model-num-layers", "1", "--data-path", str(corpus),
            "--data-seq-len", "32", "--data-val-fraction", "0.2", "--training-batch-size", "4",
            "--training-precision", "fp32", "--training-device", "cpu", "--training-max-steps", "2",
            "--training-callbacks", "LRSchedulerCallback", "--logging-log-dir", str(run)]
    assert train_main(args) == 0
    log = (run / "train.log").read_text()
    assert "model.preset tiny: num_layers 2 -> 1 (flag)" in log
    assert "model: DecoderModel, 25,696 parameters" in log  # tiny's 34,976 less one 9,280-parameter block
    saved = (run / "config.yaml").read_text()
    assert "preset: tiny" in saved and "num_layers: 1" in saved


def test_text_sampler_uses_python_prompts_on_the_default_corpus():
    config = Config(task="lm")
    assert TextSampler.from_config(config).prompts
    config.data.path = "my.txt"
    assert TextSampler.from_config(config).prompts is None


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", "data.path"),
        ("empty", "holds no files"),
        ("unreadable", "not UTF-8"),
        ("vocab", "tokenizer/vocab mismatch"),
        ("bin_dtype", "not a multiple of 2"),
    ],
)
def test_cli_reports_data_errors_as_one_line_exit_2(tmp_path, capsys, case, fragment):
    path, extra = tmp_path / "corpus.txt", []
    path.write_text(TEXT * 4, encoding="utf-8")
    if case == "missing":
        path = tmp_path / "missing.txt"
    elif case == "empty":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "unreadable":
        path.write_bytes(b"\xff\xfe\xfa" * 100)
    elif case == "vocab":
        extra = ["--model-vocab-size", "128"]
    elif case == "bin_dtype":
        path = tmp_path / "tokens.bin"
        np.arange(99, dtype=np.uint8).tofile(path)
    args = [*TINY_CLI, "--data-path", str(path), "--training-max-steps", "2", *extra,
            "--logging-log-dir", str(tmp_path / "run")]
    assert train_main(args) == 2
    line = error_line(capsys)
    assert line.startswith("error: ") and fragment in line


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    from helpers import run_cli

    path = tmp_path / "tokens.bin"
    path.write_bytes(np.arange(200, dtype=np.uint16).tobytes())
    path.with_suffix(".json").write_text(json.dumps({"dtype": "uint32"}))
    proc = run_cli([*TINY_CLI, "--data-path", str(path), "--logging-log-dir", str(tmp_path / "run")], cwd=tmp_path,
                   env={"LLM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: data.path")


def test_resumed_run_matches_an_uninterrupted_one_bitwise(tmp_path):
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(40)), encoding="utf-8")
    # 7 batches an epoch: the checkpoint at step 9 sits inside the second epoch (another window phase).
    args = [*TINY_CLI, "--data-path", str(corpus), "--training-max-steps", "18", "--checkpoint-interval", "9",
            "--training-val-max-batches", "1", "--training-callbacks", "LRSchedulerCallback", "ModelCheckpoint"]
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "a")]) == 0
    resume = tmp_path / "a" / "checkpoints" / "step-00000009"
    assert train_main([*args, "--logging-log-dir", str(tmp_path / "b"), "--checkpoint-resume", str(resume)]) == 0
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_prepared_directory_brings_its_tokenizer(tmp_path):
    """`--data-path OUT` of `python -m llm.data.prepare ... --tokenizer bpe` trains on OUT's tokenizer and vocabulary
    without being told (its ids mean nothing under another tokenizer)."""
    from llm.data.prepare import main as prepare_main

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    assert prepare_main([str(tmp_path / "src"), str(tmp_path / "out"), "--tokenizer", "bpe",
                         "--vocab-size", "300"]) == 0
    config = Config(task="lm")
    config.data.path = str(tmp_path / "out")
    values = LMTask.resolved_values(config)
    assert values["data.tokenizer"] == str(tmp_path / "out" / "tokenizer.json")
    assert 257 <= values["model.vocab_size"] <= 300
