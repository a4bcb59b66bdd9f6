"""Preference records: checked reading (file:line errors), rendering with the sft template, completion-only labels,
cuts, batching, the demo set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import call_main

from llm.data.preference import (
    PairCollate,
    PreferencePairs,
    demo_records,
    encode_pair,
    parse_preference_record,
    read_preference_records,
)
from llm.data.sft import IGNORE_INDEX
from llm.data.tokenizers import ByteTokenizer
from llm.errors import ConfigError
from llm.training.train import main as train_main

TOK = ByteTokenizer()


def _answer_text(ids: np.ndarray, labels: np.ndarray) -> bytes:
    return bytes(int(t) for t in labels[labels != IGNORE_INDEX])


def test_string_and_chat_records_render_the_same_tokens_with_labels_on_the_completion_only():
    plain = parse_preference_record({"prompt": "2+3=", "chosen": "5", "rejected": "23"}, "f:1")
    chat = parse_preference_record({"prompt": [{"role": "user", "content": "2+3="}],
                                    "chosen": [{"role": "assistant", "content": "5"}],
                                    "rejected": [{"role": "assistant", "content": "23"}], "score": 7}, "f:2")
    a, _ = encode_pair(plain, TOK, 64)
    b, _ = encode_pair(chat, TOK, 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c_ids, c_lab, r_ids, r_lab = a
    assert _answer_text(c_ids, c_lab) == b"5\0" and _answer_text(r_ids, r_lab) == b"23\0"  # content + EOS
    assert bytes(c_ids.tolist()).endswith(b"### User:\n2+3=\n\n### Assistant:\n5")


def test_earlier_assistant_turns_of_a_prompt_are_prompt():
    record = parse_preference_record({"prompt": [{"role": "user", "content": "1+1="},
                                                 {"role": "assistant", "content": "2"},
                                                 {"role": "user", "content": "and 2+2="}],
                                      "chosen": "4", "rejected": "22"}, "f:1")
    (c_ids, c_lab, r_ids, r_lab), cut = encode_pair(record, TOK, 128)
    assert not cut and _answer_text(c_ids, c_lab) == b"4\0" and _answer_text(r_ids, r_lab) == b"22\0"


def test_a_pair_whose_completion_is_cut_away_is_dropped_and_a_cut_one_kept():
    record = parse_preference_record({"prompt": "x" * 40, "chosen": "yes", "rejected": "no"}, "f:1")
    pair, cut = encode_pair(record, TOK, 30)
    assert pair is None and cut
    pair, cut = encode_pair(record, TOK, 68)  # 71 and 70 tokens: both cut inside their answers
    assert pair is not None and cut and len(pair[0]) == len(pair[2]) == 68
    assert _answer_text(pair[0], pair[1]) == b"ye" and _answer_text(pair[2], pair[3]) == b"no"


@pytest.mark.parametrize(
    "line, message",
    [
        ('["a"]', "expected a JSON object, got a JSON array"),
        ('{"prompt": "a", "chosen": "b"}', "missing 'rejected'"),
        ('{"prompt": 3, "chosen": "b", "rejected": "c"}', "'prompt' must be a string or a non-empty list"),
        ('{"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"}', "prompt[0] needs a role"),
        ('{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "b", '
         '"rejected": "c"}', "ends with an assistant turn"),
        ('{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}',
         "'chosen' must be a string or a list of one assistant message"),
        ('{"prompt": "a", "chosen": "b", "rejected": "\\ud800"}', "rejected holds a lone surrogate"),
        ('{"prompt": "a", "prompt": "b", "chosen": "b", "rejected": "c"}', "appears twice"),
        ('{"prompt": "a", "chosen": "b",', "not valid JSON"),
    ],
)
def test_bad_records_are_refused_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "11"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_preference_records(str(path))
    assert f"{path}:3: " in str(info.value) and message in str(info.value) and "\n" not in str(info.value)


def test_the_train_cli_refuses_a_bad_file_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "1+1=", "chosen": "2"}\n', encoding="utf-8")
    proc = call_main(train_main, ["--task", "dpo", "--data-path", str(path), "--logging-log-dir",
                                  str(tmp_path / "run")], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and f"{path}:1" in proc.stderr and "'rejected'" in proc.stderr


def test_a_special_token_in_a_completion_is_refused_naming_the_field():
    record = parse_preference_record({"prompt": "a", "chosen": "b", "rejected": "c\u0000d"}, "f:4")
    with pytest.raises(ConfigError, match=r"f:4: rejected holds the tokenizer's end-of-sequence"):
        encode_pair(record, TOK, 64)


def test_pairs_batch_as_b_by_2_rows_with_the_reference_when_attached():
    records = [parse_preference_record(r, f"demo {i}") for i, r in enumerate(demo_records(4, seed=3))]
    pairs = PreferencePairs([encode_pair(r, TOK, 64)[0] for r in records])
    input_ids, labels = PairCollate(0)([pairs[i] for i in range(4)])
    assert input_ids.shape == labels.shape and input_ids.shape[:2] == (4, 2)
    assert (labels[input_ids == 0] == IGNORE_INDEX).all()  # padding is never a label
    pairs.set_reference(np.arange(8, dtype=np.float32).reshape(4, 2))
    *_, ref = PairCollate(0)([pairs[i] for i in (2, 3)])
    assert torch.equal(ref, torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    with pytest.raises(ValueError):
        pairs.set_reference(np.zeros((3, 2)))


def test_the_demo_is_seeded_and_prefers_the_sum():
    assert demo_records(50, seed=1) == demo_records(50, seed=1) != demo_records(50, seed=2)
    for record in demo_records(50, seed=1):
        parsed = parse_preference_record(json.loads(json.dumps(record)), "demo")
        a, b = parsed.prompt[-1][1].rstrip("=").split("+")
        assert parsed.chosen == str(int(a) + int(b)) and parsed.rejected == a + b
