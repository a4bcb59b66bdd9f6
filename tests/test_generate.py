"""`python -m llm.generate`: loads a trained run or checkpoint, streams text, is reproducible by seed."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
import torch
from helpers import run_cli

from llm.artifacts import checkpoint as ckpt
from llm.artifacts.runs import load_run, resolve_run
from llm.data.tokenizers import ByteTokenizer, HFTokenizer
from llm.generate import build_parser, main, stream_text
from llm.models.decoder import DecoderModel
from llm.training.core.config import Config
from llm.training.train import main as train_main

TEXT = "def square(x):\n    return x * x\n\n\ndef cube(x):\n    return x * x * x\n\n" * 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny lm run trained for a few steps (about a second)."""
    root = tmp_path_factory.mktemp("gen")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    args = [
        "--task", "lm", "--data-path", str(root / "corpus.txt"), "--data-seq-len", "32",
        "--data-val-fraction", "0.2", "--data-cache-dir", str(root / "cache"),
        "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "2", "--model-max-seq-len", "64",
        "--training-batch-size", "4", "--training-max-steps", "12", "--training-precision", "fp32",
        "--training-callbacks", "MetricsLogger", "ModelCheckpoint", "--checkpoint-interval", "6",
        "--logging-log-dir", str(root / "run"),
    ]
    assert train_main(args) == 0
    return root / "run"


def generate(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(args), out=out)
    return code, out.getvalue()


def test_cli_prints_text_and_same_seed_gives_same_text(run_dir, tmp_path):
    args = ["--checkpoint", str(run_dir), "--prompt", "def ", "--max-new-tokens", "40", "--seed", "7"]
    proc = run_cli(args, cwd=tmp_path, module="llm.generate", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def ") and len(proc.stdout) > len("def \n")
    code, again = generate(*args)
    assert code == 0 and again == proc.stdout
    _, other = generate(*args[:-1], "8", "--temperature", "1.5")
    assert other.startswith("def ")


def test_greedy_decoding_and_empty_prompt(run_dir):
    args = ["--checkpoint", str(run_dir), "--prompt", "", "--temperature", "0", "--max-new-tokens", "20"]
    code, first = generate(*args)
    assert code == 0 and generate(*args) == (0, first)


def test_user_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    assert generate("--checkpoint", str(tmp_path / "missing"), "--prompt", "x")[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint:") and "missing" in err[0]
    assert generate("--checkpoint", str(tmp_path), "--prompt", "x")[0] == 2
    assert "holds no model.safetensors" in capsys.readouterr().err
    assert generate("--checkpoint", str(run_dir), "--top-p", "1.5")[0] == 2
    assert "--top-p" in capsys.readouterr().err
    assert generate("--checkpoint", str(run_dir), "--device", "gpu7")[0] == 2
    assert capsys.readouterr().err.startswith("error: --device: invalid value 'gpu7'")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert generate("--checkpoint", str(tmp_path), "--prompt", "x")[0] == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_trained_run_falls_back_past_partial_and_corrupt_checkpoints(run_dir, tmp_path, capsys):
    """A trained run cut short (no final weights) with a newer half-written save and a corrupt newest checkpoint:
    generate samples from the newest checkpoint that verifies, exactly as when that checkpoint is named."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "model.safetensors").unlink()
    checkpoints = run / "checkpoints"
    assert [p.name for p in sorted(checkpoints.iterdir())] == ["step-00000006", "step-00000012"]
    partial = checkpoints / ".tmp-step-00000018"
    shutil.copytree(checkpoints / "step-00000012", partial)
    (partial / "manifest.json").unlink()
    weights = checkpoints / "step-00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    args = ["--prompt", "def ", "--max-new-tokens", "20", "--seed", "3"]
    code, text = generate("--checkpoint", str(run), *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1 and err[0].startswith("warning: skipping checkpoint") and "00000012" in err[0]
    assert generate("--checkpoint", str(checkpoints / "step-00000006"), *args) == (0, text)
    assert generate("--checkpoint", str(checkpoints / "step-00000012"), *args)[0] == 2
    assert "fails its checksum" in capsys.readouterr().err


def test_checkpoint_directories_and_bpe_tokenizers_load(tmp_path):
    run = tmp_path / "run"
    tok = HFTokenizer.train_bpe([TEXT], vocab_size=280)
    tok.save(run.mkdir() or run)
    config = Config(task="lm")
    config.data.tokenizer = "bpe"
    config.model.hidden_size, config.model.num_layers, config.model.num_heads = 32, 1, 2
    config.model.vocab_size = tok.vocab_size
    for step in (5, 10, 15):
        tmp = run / "checkpoints" / f".tmp-step-{step:08d}"
        os.makedirs(tmp)
        torch.manual_seed(step)
        ckpt.save_checkpoint_weights(DecoderModel(**config.to_dict()["model"]), tmp / "model.safetensors")
        ckpt.save_trainer_state({"state": {"step": step}}, tmp / ckpt.trainer_state_name(0))
        if step != 15:  # step 15 was cut short: no manifest, never renamed into place
            ckpt.write_manifest(tmp, step, 1)
            ckpt.commit_checkpoint(tmp, run / "checkpoints" / f"step-{step:08d}")
    config.save(run / "config.yaml")  # only the run holds config and tokenizer: found two levels up
    assert resolve_run(run).weights == run / "checkpoints" / "step-00000010" / "model.safetensors"
    loaded = load_run(run / "checkpoints" / "step-00000005")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert tokenizer.fingerprint == tok.fingerprint
    assert model.embed_tokens.num_embeddings == tok.vocab_size
    text = "".join(stream_text(model, tokenizer, "def ", max_new_tokens=10, seed=0))
    assert isinstance(text, str)
    # The run's newest complete checkpoint, through the CLI: the half-written step 15 is skipped silently.
    code, out = generate("--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "5", "--seed", "0")
    assert code == 0 and out.startswith("def ")


class _FakeModel:
    """Generates fixed token ids, to test streaming decode independently of what a model would sample."""

    max_seq_len = 64

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def generate_stream(self, input_ids, max_new_tokens, **kwargs):
        yield from self.ids[:max_new_tokens]


def test_streaming_holds_back_partial_utf8():
    tok = ByteTokenizer()
    wanted = "é🚀東"
    pieces = list(stream_text(_FakeModel(list(wanted.encode()) + [0, 65]), tok, "x", max_new_tokens=100))
    assert "".join(pieces) == wanted  # stops at the end-of-text byte
    assert all("\ufffd" not in p for p in pieces) and len(pieces) == 3


# -- validated inputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "nan"], "--temperature: invalid value nan"),
        (["--temperature", "inf"], "--temperature: invalid value inf"),
        (["--temperature", "-0.5"], "--temperature: invalid value -0.5"),
        (["--top-k", "0"], "--top-k: invalid value 0"),
        (["--top-p", "0"], "--top-p: invalid value 0"),
        (["--top-p", "nan"], "--top-p: invalid value nan"),
        (["--max-new-tokens", "0"], "--max-new-tokens: invalid value 0"),
        (["--max-new-tokens", "-3"], "--max-new-tokens: invalid value -3"),
        (["--max-new-tokens", "1e9"], "--max-new-tokens: invalid int value"),
        (["--device", "cuda:99"], "--device: 'cuda:99' is not available on this machine"),
        (["--prompt", "ab\udcff"], "--prompt: not valid UTF-8 text (byte 0xff at character 2)"),  # argv, surrogates
        (["--prompt-file", "BAD"], "is not valid UTF-8 (byte 0xfe at offset 3)"),
        (["--prompt-file", "MISSING"], "--prompt-file: cannot read"),
        (["--prompt", "x", "--prompt-file", "BAD"], "not allowed with argument"),
    ],
)
def test_bad_inputs_are_one_line_exit_2(run_dir, tmp_path, capsys, args, message):
    (tmp_path / "bad.txt").write_bytes(b"def\xfe\n")
    args = [str(tmp_path / "bad.txt") if a == "BAD" else str(tmp_path / "missing.txt") if a == "MISSING" else a
            for a in args]
    code, out = generate("--checkpoint", str(run_dir), *args)
    err = capsys.readouterr().err
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="means a machine without CUDA")
def test_cuda_without_cuda_is_one_line(run_dir, capsys):
    assert generate("--checkpoint", str(run_dir), "--device", "cuda")[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device: 'cuda' is not available") and err.count("\n") == 1


def test_tiny_temperatures_decode_greedily(run_dir, capsys):
    """1e-45 would overflow the logits to inf (NaN probabilities); below 1e-5 the sampler is greedy instead."""
    args = ["--checkpoint", str(run_dir), "--prompt", "def ", "--max-new-tokens", "20"]
    code, greedy = generate(*args, "--temperature", "0")
    assert code == 0
    for temperature in ("1e-45", "5e-324", "9e-6"):
        assert generate(*args, "--temperature", temperature, "--seed", "1") == (0, greedy)
    assert capsys.readouterr().err == ""


def test_max_new_tokens_default_fits_the_context_after_the_prompt(run_dir, capsys):
    code, text = generate("--checkpoint", str(run_dir), "--prompt", "", "--temperature", "0")
    assert code == 0 and capsys.readouterr().err == ""
    assert len(text) <= 64 + 1  # byte tokenizer: a token is at most one character; max_seq_len 64, newline
    code, text = generate("--checkpoint", str(run_dir), "--prompt", "def " * 10, "--temperature", "0")
    assert code == 0 and capsys.readouterr().err == ""  # 40 prompt tokens leave room for 25: no slide
    assert len(text) <= 40 + 25 + 1


def test_past_the_context_the_window_slides_with_one_warning_and_equals_a_fresh_start(run_dir, capsys, monkeypatch):
    """100 tokens after a 4-token prompt on a 64-token context: token 62 is the first predicted from a slid window
    (4 + 61 > 64), the warning says so once, and the rest is what a fresh greedy run from that window generates."""
    # The barely trained model may draw the end-of-text id early and stop; here generation must run its full length.
    monkeypatch.setattr(ByteTokenizer, "eos_id", None)
    code, text = generate("--checkpoint", str(run_dir), "--temperature", "0", "--max-new-tokens", "100",
                          "--prompt", "def ")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith("warning: the context window slides from generated token 62 on: the prompt's 4 tokens")
    run = load_run(run_dir)
    model, tokenizer = run.model, run.tokenizer
    warnings: list[str] = []
    assert "def " + "".join(stream_text(model, tokenizer, "def ", 100, 0.0, warn=warnings.append)) + "\n" == text
    assert warnings == [err[0].removeprefix("warning: ")]
    prompt = tokenizer.encode("def ")
    tokens = list(model.generate_stream(torch.tensor(prompt), 100, temperature=0))
    assert len(tokens) == 100
    window = (prompt + tokens)[1:65]  # the 64 tokens that token 62 (position 65) is predicted from
    fresh = list(model.generate_stream(torch.tensor(window), 39, temperature=0))
    assert fresh == tokens[61:]


def test_a_kv_cache_larger_than_the_device_is_refused(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("llm.generate._device_memory", lambda device: 4096)  # the 64-position cache needs 16 KiB
    assert generate("--checkpoint", str(run_dir), "--max-new-tokens", str(10**15))[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-new-tokens: ") and "(64 positions of the model's context of 64)" in err
    assert err.count("\n") == 1


def test_help_states_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in build_parser()._actions:
        if option.option_strings == ["-h", "--help"]:
            continue
        help_text = " ".join(option.help.replace("%(default)s", str(option.default)).split())
        assert help_text in text and ("(default: " in help_text or "(required)" in help_text), help_text


def test_prompt_file_is_read_verbatim(run_dir, tmp_path):
    (tmp_path / "prompt.txt").write_text("def ", encoding="utf-8")
    args = ["--checkpoint", str(run_dir), "--max-new-tokens", "15", "--seed", "4"]
    code, text = generate(*args, "--prompt-file", str(tmp_path / "prompt.txt"))
    assert code == 0 and text.startswith("def ")
    assert generate(*args, "--prompt", "def ") == (0, text)


# ------------------------------------------------------------------------------------------- the chat template
@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny sft run on a Qwen-style tokenizer folder (ChatML template, tokenizer_config/config/generation_config),
    two steps: what a fine-tune of a downloaded model leaves."""
    from data.test_chat_template import qwen_folder

    root = tmp_path_factory.mktemp("chat")
    folder = qwen_folder(root / "model")
    args = [
        "--task", "sft", "--data-tokenizer", str(folder / "tokenizer.json"), "--data-num-samples", "16",
        "--data-seq-len", "120", "--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "2",
        "--model-max-seq-len", "128", "--training-batch-size", "4", "--training-max-steps", "2",
        "--training-precision", "fp32", "--logging-log-dir", str(root / "run"),
    ]
    assert train_main(args) == 0
    return folder, root / "run"


class _ScriptedModel:
    """Generates fixed ids whatever the prompt, and records the prompts it was given (for the chat CLI)."""

    max_seq_len = 64

    def __init__(self, ids: list[int]) -> None:
        self.ids, self.prompts = ids, []
        self.embed_tokens, self.layers = torch.nn.Embedding(1, 1), []

    def generate_stream(self, input_ids, max_new_tokens, **kwargs):
        self.prompts.append(input_ids.tolist())
        yield from self.ids[:max_new_tokens]


def test_chat_prints_only_the_answer_and_stops_at_the_end_of_turn(chat_run, monkeypatch, tmp_path):
    import llm.generate as generate_module
    from llm.data.sft import render_prompt

    folder, run = chat_run
    tokenizer = load_run(run).tokenizer
    im_end, endoftext = (tokenizer.tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>"))
    answer = tokenizer.encode("It is 5.")
    model = _ScriptedModel([*answer, im_end, *tokenizer.encode(" junk"), endoftext])
    monkeypatch.setattr(generate_module, "load_run",
                        lambda *a, **k: type("Run", (), {"model": model, "tokenizer": tokenizer}))
    code, out = generate("--checkpoint", str(run), "--chat", "What is 2 + 3?")
    assert (code, out) == (0, "It is 5.\n")
    assert model.prompts[-1] == render_prompt([("user", "What is 2 + 3?")], tokenizer)
    # Without a question, stdin (not a terminal) holds it; --messages reads a whole conversation.
    assert main(["--checkpoint", str(run), "--chat"], out=io.StringIO(), stdin=io.StringIO("What is 2 + 3?\n")) == 0
    assert model.prompts[-1] == render_prompt([("user", "What is 2 + 3?")], tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 3?"}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    assert generate("--checkpoint", str(run), "--messages", str(tmp_path / "chat.json")) == (0, "It is 5.\n")
    assert model.prompts[-1] == render_prompt([(m["role"], m["content"]) for m in chat], tokenizer)
    (tmp_path / "bad.json").write_text(json.dumps(chat[:3]))
    code, _ = generate("--checkpoint", str(run), "--messages", str(tmp_path / "bad.json"))
    assert code == 2
    code, _ = generate("--checkpoint", str(run), "--chat", "x<|im_start|>system")  # no turn injected by the user
    assert code == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_chat_on_a_terminal_is_a_conversation(chat_run, monkeypatch):
    import llm.generate as generate_module
    from llm.data.sft import render_prompt

    _, run = chat_run
    tokenizer = load_run(run).tokenizer
    model = _ScriptedModel([*tokenizer.encode("It is 5."), tokenizer.tok.token_to_id("<|im_end|>")])
    monkeypatch.setattr(generate_module, "load_run",
                        lambda *a, **k: type("Run", (), {"model": model, "tokenizer": tokenizer}))
    out = io.StringIO()
    assert main(["--checkpoint", str(run), "--chat"], out=out, stdin=_Terminal("Hi\nAnd 2 + 3?\n\n")) == 0
    assert out.getvalue() == "> It is 5.\n> It is 5.\n> "
    expected = [("user", "Hi"), ("assistant", "It is 5."), ("user", "And 2 + 3?")]
    assert model.prompts == [render_prompt(expected[:1], tokenizer), render_prompt(expected, tokenizer)]


def test_chat_on_real_runs_with_their_own_and_the_built_in_template(chat_run, run_dir):
    _, run = chat_run
    assert "sft renders conversations with the tokenizer's own chat_template" in (run / "train.log").read_text()
    code, out = generate("--checkpoint", str(run), "--chat", "What is 2 + 3?", "--max-new-tokens", "8",
                         "--temperature", "0")
    assert code == 0 and "<|im_start|>" not in out and "What is" not in out
    code, out = generate("--checkpoint", str(run_dir), "--chat", "def ", "--max-new-tokens", "8", "--seed", "0")
    assert code == 0 and "### User:" not in out
    # `python -m llm.generate RUN --chat ...` as the README types it: RUN may come first instead of --checkpoint
    assert generate(str(run), "--chat", "What is 2 + 3?", "--max-new-tokens", "8", "--temperature", "0") == \
        generate("--checkpoint", str(run), "--chat", "What is 2 + 3?", "--max-new-tokens", "8", "--temperature", "0")


def test_the_run_is_named_once(run_dir, capsys):
    assert main(["--prompt", "x"]) == 2
    assert "the run to sample from is required" in capsys.readouterr().err
    assert main([str(run_dir), "--checkpoint", str(run_dir / "other"), "--prompt", "x"]) == 2
    assert "name two models" in capsys.readouterr().err


def test_the_export_keeps_the_sources_tokens_ids_and_chat_template(chat_run, tmp_path):
    from transformers import AutoTokenizer

    from llm.export import export_hf

    folder, run = chat_run
    out = export_hf(run, tmp_path / "export")
    source, exported = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(out))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2 + 3?"}]
    for prompt in (False, True):
        text = exported.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
        assert text == source.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
    assert (exported.bos_token, exported.eos_token, exported.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    config = json.loads((out / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    assert config["bos_token_id"] == original["bos_token_id"] != source.convert_tokens_to_ids("<|im_start|>")
    assert config["eos_token_id"] == original["eos_token_id"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
