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
    max_record_bytes,
    parse_record,
    read_located_records,
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


# ------------------------------------------------------------------------------------- untrusted records (issue 22)
def test_a_50_mb_record_is_refused_in_bounded_memory(tmp_path):
    """One 50 MB line: refused by its line number after reading at most the cap (1 MiB for data.seq_len 160),
    not parsed; the peak of Python allocations stays a few MiB."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    good = json.dumps({"prompt": "p", "response": "r"}) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(good)
        f.write('{"prompt": "' + "x" * (50 << 20) + '", "response": "y"}\n')
    cap = max_record_bytes(160)
    assert cap == 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=rf"^data\.path: {re.escape(str(path))}:2: the record is longer than "
                                              rf"{cap} bytes"):
            read_located_records(str(path), max_line=cap)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * cap, peak
    assert max_record_bytes(100_000) == 64 * 100_001  # a long window takes longer records


def test_rendering_a_long_record_tokenizes_only_its_window():
    import tracemalloc

    messages = [("user", "q"), ("assistant", "a" * (8 << 20))]  # 8 MiB of answer: 64 MiB as int64 ids
    tracemalloc.start()
    try:
        ids, answer = render(messages, BYTES, max_tokens=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ids) == len(answer) == 100 and peak < 1 << 20, peak
    full, _ = render(messages[:1] + [("assistant", "a" * 200)], BYTES)
    assert np.array_equal(ids, full[:100])  # the cut text gives exactly the first tokens of the whole one
    example = to_example(ids, answer, 50)
    assert example is not None and example[0].base is None  # a copy: the rendered record is not kept alive


def test_records_are_lines_split_at_newlines_only(tmp_path):
    """U+2028 and U+0085 inside a JSON string are line breaks to str.splitlines, not to JSONL; a BOM, CRLF and a
    surrogate pair escape are valid too."""
    path = tmp_path / "odd.jsonl"
    records = [{"prompt": "a\u2028b\u0085c", "response": "\\ud83d\\ude00"}, {"prompt": "q", "response": "r"}]
    text = "\r\n".join(json.dumps(r, ensure_ascii=False).replace("\\\\", "\\") for r in records)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8") + b"\r\n")
    located = read_located_records(str(path))
    assert [r.where for r in located] == [f"{path}:1", f"{path}:2"]
    assert located[0].messages == [("user", "a\u2028b\u0085c"), ("assistant", "\U0001F600")]


def test_a_bad_record_is_named_in_file_order_whatever_the_split(tmp_path):
    """The first bad record of the file is the one reported, though the split shuffles the records."""
    config = Config(task="sft")
    good = json.dumps({"prompt": "p", "response": "r"})
    lines = [good] * 20 + ['{"prompt": "p", "response": "a\\u0000"}', '{"prompt": "\\u0000", "response": "r"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config.data.path = str(tmp_path / "d.jsonl")
    dm = SFTDataModule(config.data, batch_size=2, seed=config.seed)
    with pytest.raises(ConfigError, match=r"d\.jsonl:21: response holds the tokenizer's end-of-sequence token"):
        dm.setup()


def test_a_special_token_in_a_prompt_given_to_render_names_the_message():
    with pytest.raises(ConfigError, match=r"^messages\[0\]\.content holds the tokenizer's end-of-sequence token"):
        render_prompt([("user", "stop\x00here")], BYTES)


def test_an_eos_of_the_plain_vocabulary_is_refused_by_its_id_only_where_it_tokenizes_so(tmp_path):
    """A tokenizer.json whose "</s>" is a plain vocabulary entry, not an added token: "end</s>" is one unknown word,
    harmless; "</s>" standing alone is the EOS id in the content, refused."""
    words = ["###", "User:", "Assistant:", "q", "end", "<unk>", "</s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    ids, _ = render([("user", "q"), ("assistant", "end</s>")], hf)
    assert list(ids).count(hf.eos_id) == 1  # only the template's own, after the answer
    with pytest.raises(ConfigError, match=r"^data\.path: f:3: response holds the tokenizer's end-of-sequence or "):
        render([("user", "q"), ("assistant", "end </s>")], hf, where="f:3", fields=("prompt", "response"))
