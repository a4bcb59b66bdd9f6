"""Battery (issue 22, kinds 5 and 1): untrusted data inputs and set-up refusals, through the train CLI in-process.

Each refusal case asserts the whole outcome: exit status 2, exactly one stderr line that names the file and line
(or the field) and the value, and nothing written: no run directory, no other file in the working directory. The
run directory is made after the run is set up (data read and tokenized, model and adapters built, layout applied),
so also the refusals that only set-up finds leave nothing behind. The last cases check correct results: a record
that looks odd but is valid trains, and a model vocabulary larger than the tokenizer's samples only decodable ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import call_main, read_metrics

from llm.training.train import main

TINY = ["--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "4",
        "--training-precision", "fp32", "--training-device", "cpu", "--training-max-steps", "2",
        "--training-callbacks", "LRSchedulerCallback", "--logging-loggers", "jsonl", "--logging-log-dir", "run",
        "--logging-level", "WARNING"]  # the start-up lines (token cache progress) are not what is checked
SFT = ["--task", "sft", "--training-batch-size", "2", "--data-val-fraction", "0.25", *TINY]
LM = ["--task", "lm", "--data-seq-len", "16", "--training-batch-size", "2", "--training-val-max-batches", "1", *TINY]
REGRESSION = ["--task", "regression", "--data-seq-len", "2", "--training-batch-size", "1",
              "--data-val-fraction", "0.34", *TINY]
GOOD = json.dumps({"prompt": "What is 1 + 1?", "response": "2"})


def refused(tmp_path: Path, args: list[str], *fragments: str) -> str:
    """Run the CLI in `tmp_path`; assert exit 2, one `error:` line holding every fragment, and that nothing was
    written (the working directory holds what the case put there and nothing else). Returns the line."""
    before = sorted(os.listdir(tmp_path))
    proc = call_main(main, args, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    assert sorted(os.listdir(tmp_path)) == before
    return lines[0]


def sft_file(tmp_path: Path, bad: str | bytes, good_before: int = 3) -> Path:
    """A JSONL file of `good_before` good records, then `bad` (line good_before + 1), then good ones again."""
    path = tmp_path / "data.jsonl"
    bad_bytes = bad if isinstance(bad, bytes) else bad.encode("utf-8")
    good = (GOOD + "\n").encode()
    path.write_bytes(good * good_before + bad_bytes + b"\n" + good * 8)
    return path


def msgs(*messages: object) -> str:
    return json.dumps({"messages": list(messages)})


USER, ASSISTANT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}

# (id, the bad line, fragments its one line must hold besides the file:line)
SFT_CASES = [
    ("nested-array", "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ("nested-in-messages", '{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}", ["nested too deeply"]),
    ("surrogate-prompt", '{"prompt": "a\\ud800b", "response": "x"}', ["prompt", "lone surrogate", "'\\ud800'"]),
    ("surrogate-content", msgs(USER, {"role": "assistant", "content": "ok \\udfff"}).replace("\\\\", "\\"),
     ["messages[1].content", "lone surrogate", "'\\udfff'"]),
    ("nul-response", '{"prompt": "q", "response": "a\\u0000b"}', ["response", "end-of-sequence", "NUL", "character 1"]),
    ("nul-system", msgs({"role": "system", "content": "\u0000"}, USER, ASSISTANT),
     ["messages[0].content", "end-of-sequence", "NUL"]),
    ("messages-not-a-list", '{"messages": "Hi"}', ["'messages' must be a non-empty list", "'Hi'"]),
    ("messages-empty", '{"messages": []}', ["'messages' must be a non-empty list"]),
    ("message-not-an-object", msgs("Hi", ASSISTANT), ["messages[0] must be an object", "'Hi'"]),
    ("role-not-a-string", msgs({"role": 5, "content": "Hi"}, ASSISTANT), ["messages[0] needs a role", "got 5"]),
    ("role-a-list", msgs({"role": ["user"], "content": "Hi"}, ASSISTANT), ["messages[0] needs a role", "JSON array"]),
    ("role-unknown", msgs({"role": "tool", "content": "Hi"}, ASSISTANT), ["messages[0] needs a role", "'tool'"]),
    ("content-a-number", msgs(USER, {"role": "assistant", "content": 42}), ["messages[1]", "'content'", "got 42"]),
    ("content-null", msgs(USER, {"role": "assistant", "content": None}), ["messages[1]", "'content'", "got None"]),
    ("content-nan", '{"prompt": NaN, "response": "x"}', ["'prompt' must be a string", "got nan"]),
    ("content-huge-float", '{"prompt": "q", "response": 1e999}', ["'response' must be a string", "got inf"]),
    ("huge-integer", '{"prompt": "q", "response": ' + "9" * 5000 + "}", ["not valid JSON", "digits"]),
    ("no-assistant-turn", msgs(USER), ["no assistant turn"]),
    ("empty-conversation", "{}", ["expected 'prompt' and 'response', or 'messages'"]),
    ("both-formats", '{"prompt": "q", "response": "a", "messages": []}', ["both 'messages' and 'prompt'"]),
    ("duplicate-key", '{"prompt": "q", "response": "a", "response": "b"}', ["'response' appears twice"]),
    ("not-an-object", "[1, 2]", ["expected a JSON object", "JSON array"]),
    ("bad-json", '{"prompt": "q",', ["not valid JSON"]),
]


@pytest.mark.parametrize(("line", "fragments"), [c[1:] for c in SFT_CASES], ids=[c[0] for c in SFT_CASES])
def test_a_bad_sft_record_is_one_line_with_its_file_and_line_and_nothing_is_written(tmp_path, line, fragments):
    path = sft_file(tmp_path, line)
    refused(tmp_path, [*SFT, "--data-path", str(path)], f"data.path: {path}:4: ", *fragments)


def test_a_line_that_is_not_utf8_names_its_column(tmp_path):
    path = sft_file(tmp_path, b'{"prompt": "caf\xe9", "response": "x"}')
    refused(tmp_path, [*SFT, "--data-path", str(path)], f"data.path: {path}:4: not UTF-8", "column 16")


def test_a_record_over_the_size_cap_is_refused_by_line(tmp_path):
    # data.seq_len 160 caps a record at max(1 MiB, 64 x 161 bytes) = 1 MiB
    path = sft_file(tmp_path, json.dumps({"prompt": "x" * (1 << 20), "response": "y"}), good_before=1)
    refused(tmp_path, [*SFT, "--data-path", str(path)], f"data.path: {path}:2: ", "longer than 1048576 bytes",
            "data.seq_len")


def test_a_tokenizer_json_special_token_in_content_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["###", "User:", "Assistant:", "q", "the", "end", "<unk>", "</s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    path = sft_file(tmp_path, '{"prompt": "q", "response": "the end</s> the end"}')
    refused(tmp_path, [*SFT, "--data-tokenizer", str(tmp_path / "tok" / "tokenizer.json"), "--data-path", str(path)],
            f"data.path: {path}:4: response", "end-of-sequence token '</s>'", "character 7")


@pytest.mark.parametrize("where", ["file", "in-a-directory"])
def test_a_fifo_as_sft_data_is_refused_without_blocking(tmp_path, where):
    if where == "file":
        os.mkfifo(tmp_path / "pipe.jsonl")
        path = tmp_path / "pipe.jsonl"
    else:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.jsonl").write_text(GOOD + "\n")
        os.mkfifo(tmp_path / "d" / "b.jsonl")
        path = tmp_path / "d"
    refused(tmp_path, [*SFT, "--data-path", str(path)], "data.path: ", "pipe.jsonl" if where == "file" else "b.jsonl",
            "FIFO")


def test_an_empty_sft_file_names_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    refused(tmp_path, [*SFT, "--data-path", str(tmp_path / "empty.jsonl")], "data.path: ", "empty.jsonl",
            "holds no records")


# ---------------------------------------------------------------------------------- refusals that set-up finds
SETUP_CASES = [
    # (id, files {name: bytes}, flags, fragments)
    ("sft-fewer-records-than-a-batch", {"few.jsonl": (GOOD + "\n").encode() * 3},
     [*SFT, "--data-path", "few.jsonl", "--training-batch-size", "4"], ["training.batch_size", "fewer than one"]),
    ("lm-corpus-shorter-than-a-batch", {"tiny.txt": b"ab"},
     [*LM, "--data-path", "tiny.txt", "--data-cache-dir", "cache"], ["data.seq_len", "fewer than one global batch"]),
    ("lm-corpus-not-utf8", {"bad.txt": b"ok\n\xff\xfe" * 50},
     [*LM, "--data-path", "bad.txt", "--data-cache-dir", "cache"], ["data.path", "bad.txt", "not UTF-8", "offset 3"]),
    ("lm-jsonl-nested-too-deeply", {"deep.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n"},
     [*LM, "--data-path", "deep.jsonl", "--data-cache-dir", "cache"], ["data.path", "deep.jsonl", "line 1",
                                                                       "nested too deeply"]),
    ("lm-jsonl-lone-surrogate", {"s.jsonl": b'{"text": "a\\ud800"}\n'},
     [*LM, "--data-path", "s.jsonl", "--data-cache-dir", "cache"], ["data.path", "s.jsonl", "line 1",
                                                                    "lone surrogate"]),
    ("lm-bin-sidecar-of-an-unknown-dtype", {"t.bin": b"\x01\x00" * 4096, "t.json": b'{"dtype": "float64"}'},
     [*LM, "--data-path", "t.bin"], ["data.path", "sidecar", "t.json", "dtype"]),
    ("lm-bin-sidecar-not-json", {"t.bin": b"\x01\x00" * 4096, "t.json": b"[" * 100_000},
     [*LM, "--data-path", "t.bin"], ["data.path", "sidecar", "t.json"]),
    ("regression-csv-nan-cell", {"r.csv": b"a,b,y\n1,2,3\n4,nan,6\n7,8,9\n"},
     [*REGRESSION, "--data-path", "r.csv"], ["data.path", "r.csv", "line 3", "'b'", "'nan'", "not a finite number"]),
    ("regression-csv-float32-overflow", {"r.csv": b"a,b,y\n1,2,3\n4,5,1e400\n7,8,9\n"},
     [*REGRESSION, "--data-path", "r.csv"], ["data.path", "r.csv", "line 3", "'1e400'", "not a finite number"]),
    ("regression-csv-huge-target", {"r.csv": b"a,b,y\n1,2,3\n4,5,1e30\n7,8,9\n"},
     [*REGRESSION, "--data-path", "r.csv"], ["data.path", "r.csv", "line 3", "target 1e+30", "beyond"]),
    ("regression-csv-short-row", {"r.csv": b"a,b,y\n1,2,3\n4,5\n7,8,9\n"},
     [*REGRESSION, "--data-path", "r.csv"], ["data.path", "r.csv", "line 3", "has 2 columns"]),
    ("sft-tokenizer-without-eos", {},
     [*SFT, "--data-tokenizer", "tok/tokenizer.json"], ["data.tokenizer", "no end-of-sequence token"]),
    ("lora-target-not-in-model", {},
     [*SFT, "--training-lora-rank", "2", "--training-lora-targets", "qproj"], ["training.lora_targets", "'qproj'",
                                                                               "q_proj"]),
    ("lora-target-an-embedding", {},
     [*SFT, "--training-lora-rank", "2", "--training-lora-targets", "embed_tokens"],
     ["training.lora_targets", "'embed_tokens'"]),
    ("lm-bin-of-an-odd-size", {"tokens.bin": b"\x01\x00\x02"},
     [*LM, "--data-path", "tokens.bin"], ["data.path", "tokens.bin", "has 3 bytes, not a multiple of 2"]),
    ("lm-bin-id-outside-the-tokenizer", {"tokens.bin": (1000).to_bytes(2, "little") * 4096},
     [*LM, "--data-path", "tokens.bin"], ["data.path", "tokens.bin", "token id 1000", "256 ids"]),
    ("lm-validation-split-shorter-than-a-window", {"c.txt": b"abcdefgh" * 64},
     [*LM, "--data-path", "c.txt", "--data-cache-dir", "cache", "--data-val-fraction", "0.01"],
     ["data.val_fraction", "shorter than one window of 17 tokens"]),
    ("expert-parallel-not-dividing-the-processes", {},
     [*LM, "--model-use-moe", "--model-num-experts", "4", "--distributed-expert-parallel", "2",
      "--distributed-nproc-per-node", "3"], ["distributed.expert_parallel", "2", "number of processes (3)"]),
    ("expert-parallel-not-dividing-the-experts", {},
     [*LM, "--model-use-moe", "--model-num-experts", "3", "--distributed-expert-parallel", "2"],
     ["distributed.expert_parallel", "model.num_experts (3)"]),
    ("vocab-smaller-than-the-tokenizer", {},
     [*LM, "--model-vocab-size", "200"], ["model.vocab_size", "200", "smaller than the tokenizer's 256"]),
]


@pytest.mark.parametrize(("files", "args", "fragments"), [c[1:] for c in SETUP_CASES],
                         ids=[c[0] for c in SETUP_CASES])
def test_a_setup_refusal_leaves_no_run_directory(tmp_path, files, args, fragments):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    if "tok/tokenizer.json" in args:  # a tokenizer.json with no end-of-sequence token among its special tokens
        from tokenizers import Tokenizer, models

        (tmp_path / "tok").mkdir()
        Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(tmp_path / "tok" /
                                                                                        "tokenizer.json"))
    if "--data-cache-dir" in args:
        (tmp_path / "cache").mkdir()  # the token cache is the data's, not the run's: it may hold a cache
    refused(tmp_path, args, *fragments)


# ------------------------------------------------------------------------------------------------ correct results
def test_valid_but_unusual_records_train(tmp_path):
    """A BOM, CRLF line ends, U+2028 inside a string (a line break to str.splitlines, not to JSONL), a surrogate
    pair escape and unknown extra keys are all valid records: the run trains on them."""
    lines = ['{"prompt": "a\u2028b", "response": "\\ud83d\\ude00", "id": 7}', *[GOOD] * 7]
    (tmp_path / "ok.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    proc = call_main(main, [*SFT, "--data-path", "ok.jsonl"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_vocabulary_larger_than_the_tokenizers_samples_only_decodable_ids(tmp_path):
    """Kind 1: the model's 320 ids pad the byte tokenizer's 256. The sampler at the end of the run (before the
    final checkpoint) used to draw a padding id and crash; it now draws only ids the tokenizer decodes."""
    args = [*LM, "--model-vocab-size", "320", "--training-callbacks", "LRSchedulerCallback", "TextSampler"]
    proc = call_main(main, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "model.safetensors").is_file() and (run / "checkpoints").is_dir()
    samples = [r["samples"] for r in read_metrics(run) if "samples" in r]
    assert samples and all(len(s["text"]) > len(s["prompt"]) for s in samples[-1])
    from llm.generate import main as generate_main  # the sampling CLI on that run: the same rule

    proc = call_main(generate_main, ["--checkpoint", "run", "--prompt", "def ", "--max-new-tokens", "64",
                                     "--temperature", "5", "--seed", "1"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("def "), proc.stderr[-3000:]


def test_a_refused_resume_into_a_new_directory_leaves_no_run_directory(tmp_path):
    """A refusal that needs the run directory (the checkpoint `--checkpoint-resume` names does not fit the run)
    comes after it was made: the directory, made by this run and holding only its train.log, is removed again."""
    from helpers import CKPT, TINY_REGRESSION

    assert call_main(main, [*TINY_REGRESSION, *CKPT, "--training-max-steps", "2", "--logging-log-dir", "a"],
                     tmp_path).returncode == 0
    checkpoint = next((tmp_path / "a" / "checkpoints").iterdir())
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    proc = call_main(main, [*TINY_REGRESSION, *CKPT, "--training-max-steps", "4", "--training-optimizer", "sgd",
                            "--checkpoint-resume", str(checkpoint), "--logging-log-dir", "new/b"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "training.optimizer" in lines[0], proc.stderr[-3000:]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # no new/, no new/b


def test_the_set_up_lines_logged_before_the_run_directory_existed_reach_train_log(tmp_path):
    long = json.dumps({"prompt": "x" * 400, "response": "y"})
    (tmp_path / "d.jsonl").write_text("\n".join([long] + [GOOD] * 7) + "\n", encoding="utf-8")
    proc = call_main(main, [*SFT, "--data-path", "d.jsonl"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cut = "1 of 8 records are longer than data.seq_len + 1 = 161 tokens and were cut"
    assert cut in proc.stderr  # logged during set-up, before the run directory was made
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert log.count(cut) == 1


@pytest.mark.slow  # two spawned processes, in a real process (call_main cannot catch a spawned worker's stderr)
def test_a_bad_record_in_a_two_process_job_is_one_line_and_no_run_directory(tmp_path):
    """Both workers meet the bad record while they set up, before rank 0 makes the run directory: the job reports
    it once, exit 2."""
    from helpers import run_cli

    path = sft_file(tmp_path, '{"prompt": "q", "response": "a\\u0000"}')
    before = sorted(os.listdir(tmp_path))
    proc = run_cli([*SFT, "--data-path", str(path), "--distributed-nproc-per-node", "2"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: data.path: {path}:4: response holds the tokenizer's end-of-sequence token")
    assert sorted(os.listdir(tmp_path)) == before
