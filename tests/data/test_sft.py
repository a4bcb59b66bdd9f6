"""SFT data: the template, answer-only labels, special tokens, bad records, the demo set, padding."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from llm.data.sft import (
    IGNORE_INDEX,
    PadCollate,
    SFTDataModule,
    demo_records,
    parse_record,
    read_records,
    render,
    render_prompt,
    to_example,
    tokenize_records,
)
from llm.data.tokenizers import ByteTokenizer, HFTokenizer
from llm.errors import ConfigError
from llm.training.core.config import Config

BYTES = ByteTokenizer()


def answer_text(ids: np.ndarray, mask: np.ndarray) -> bytes:
    return bytes(ids[mask].tolist())


def test_prompt_response_renders_the_documented_template_with_loss_on_the_answer_only():
    messages = parse_record({"prompt": "What is 2 + 3?", "response": "5"}, "x:1")
    ids, mask = render(messages, BYTES)
    assert BYTES.decode(ids) == "### User:\nWhat is 2 + 3?\n\n### Assistant:\n5\x00"
    assert answer_text(ids, mask) == b"5\x00"  # the answer and its EOS (byte 0 for the byte tokenizer)
    inputs, labels = to_example(ids, mask, 1000)
    assert np.array_equal(inputs, ids[:-1])
    assert np.array_equal(labels[labels != IGNORE_INDEX], np.frombuffer(b"5\x00", np.uint8))
    assert (labels[:-2] == IGNORE_INDEX).all()  # the prompt and the headers carry no loss


def test_chat_labels_every_assistant_turn_and_nothing_else():
    record = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao."},
    ]}
    ids, mask = render(parse_record(record, "x:1"), BYTES)
    assert BYTES.decode(ids) == ("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nHello.\x00"
                                 "### User:\nBye\n\n### Assistant:\nCiao.\x00")
    assert answer_text(ids, mask) == b"Hello.\x00Ciao.\x00"
    prompt = render_prompt(parse_record(record, "x:1")[:4], BYTES)
    assert BYTES.decode(prompt).endswith("### User:\nBye\n\n### Assistant:\n")


def word_tokenizer(tmp_path, specials=("<s>", "</s>")) -> HFTokenizer:
    words = ["###", "User:", "Assistant:", "System:", "hi", "there", "yes", "\n", "<unk>", *specials]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(specials))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer.from_file(path)


def test_a_tokenizer_json_brings_its_own_bos_and_eos(tmp_path):
    tok = word_tokenizer(tmp_path)
    bos, eos = tok.tok.token_to_id("<s>"), tok.tok.token_to_id("</s>")
    ids, mask = render([("user", "hi there"), ("assistant", "yes")], tok)
    assert ids[0] == bos and ids[-1] == eos and list(ids).count(eos) == 1
    assert ids[mask].tolist() == [tok.tok.token_to_id("yes"), eos]


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    tok = word_tokenizer(tmp_path, specials=("<s>",))
    with pytest.raises(ConfigError, match="data.tokenizer: .*no end-of-sequence token"):
        render([("user", "hi"), ("assistant", "yes")], tok)


@pytest.mark.parametrize(("line", "fragment"), [
    ("{not json", "not valid JSON"),
    ('{"prompt": "a"}', "'response' must be a string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "needs a role in"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}', "string 'content'"),
    ('{"text": "plain"}', "expected 'prompt' and 'response', or 'messages'; found keys: text"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_records_name_the_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"prompt": "p", "response": "r"})
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_records(str(path))
    message = str(info.value)
    assert message.startswith(f"data.path: {path}:3: ") and fragment in message and "\n" not in message


def test_records_of_a_directory_are_read_in_order(tmp_path):
    for name, answer in (("b.jsonl", "2"), ("a.jsonl", "1")):
        (tmp_path / name).write_text(json.dumps({"prompt": "q", "response": answer}) + "\n", encoding="utf-8")
    assert [r[1][1] for r in read_records(str(tmp_path))] == ["1", "2"]


def test_demo_set_is_seeded_and_its_answers_are_exact():
    a, b = demo_records(300, seed=3), demo_records(300, seed=3)
    assert a == b and a != demo_records(300, seed=4)
    kinds = set()
    for record in a:
        (_, prompt), (_, answer) = [m for m in parse_record(record, "demo") if m[0] != "system"]
        if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt):
            x, op, y = int(m[1]), m[2], int(m[3])
            assert int(answer) == {"+": x + y, "-": x - y, "*": x * y}[op]
        elif m := re.fullmatch(r"Reverse the word '(\w+)'\.", prompt):
            assert answer == m[1][::-1]
        elif m := re.fullmatch(r"Write '([\w ]+)' in capital letters\.", prompt):
            assert answer == m[1].upper()
        elif m := re.fullmatch(r"Sort the letters of '(\w+)'\.", prompt):
            assert answer == "".join(sorted(m[1]))
        else:
            pytest.fail(f"unexpected demo prompt {prompt!r}")
        kinds.add(prompt.split()[0] + ("messages" if "messages" in record else ""))
    assert len(kinds) >= 8  # every kind of task in both record formats


def test_long_examples_are_cut_and_those_without_an_answer_dropped():
    long_prompt = [("user", "x" * 50), ("assistant", "yes")]
    examples, cut, dropped = tokenize_records([long_prompt, [("user", "q"), ("assistant", "a")]], BYTES, seq_len=40)
    assert (cut, dropped, len(examples)) == (1, 1, 1)
    examples, cut, dropped = tokenize_records([[("user", "q"), ("assistant", "a" * 100)]], BYTES, seq_len=30)
    assert (cut, dropped) == (1, 0) and len(examples[0][0]) == 30


def test_padding_collate_ignores_the_pad_labels():
    ids_a, mask_a = render([("user", "q"), ("assistant", "long answer")], BYTES)
    ids_b, mask_b = render([("user", "q"), ("assistant", "a")], BYTES)
    batch = [to_example(ids_a, mask_a, 100), to_example(ids_b, mask_b, 100)]
    input_ids, labels = PadCollate(pad_id=0)(batch)
    assert input_ids.shape == labels.shape == (2, len(ids_a) - 1)
    short = len(ids_b) - 1
    assert (labels[1, short:] == IGNORE_INDEX).all() and (input_ids[1, short:] == 0).all()
    assert labels[1, :short].tolist() == batch[1][1].tolist()


def test_data_module_splits_the_records_and_checks_the_global_batch(tmp_path):
    config = Config(task="sft")
    config.data.num_samples, config.data.val_fraction, config.data.seq_len = 200, 0.1, 160
    config.training.batch_size = 8
    dm = SFTDataModule(config.data, batch_size=config.training.batch_size, seed=config.seed)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (180, 20)
    input_ids, labels = next(iter(dm.train_dataloader()))
    assert input_ids.shape[0] == 8 and (labels != IGNORE_INDEX).any(dim=1).all()
    config.training.batch_size = 500
    with pytest.raises(ConfigError, match="training.batch_size: 180 training examples"):
        SFTDataModule(config.data, batch_size=config.training.batch_size, seed=config.seed).setup()
