"""A tokenizer's own chat template: SFT renders what transformers' `apply_chat_template` renders, masks the answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llm.data.chat_template import ChatTemplate
from llm.data.sft import chat_stop_ids, chat_template_of, render, render_prompt, template_name
from llm.data.tokenizers import ByteTokenizer, HFTokenizer
from llm.errors import ConfigError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}\n"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)
CORPUS = ["You are a helpful assistant.", "What is 2 + 3? It is 5.", "Hello there, how are you? Fine, thanks.",
          "system user assistant"]
CHATS = [
    [("user", "What is 2 + 3?"), ("assistant", "5")],
    [("system", "Be brief."), ("user", "Hello there"), ("assistant", "Hi."), ("user", "How are you?"),
     ("assistant", "Fine, thanks.")],
    [("user", "Hello"), ("assistant", "Hi"), ("user", "2 + 3?"), ("assistant", "It is 5.")],
]


def qwen_folder(path: Path, template: str = QWEN_TEMPLATE) -> Path:
    """A tiny Qwen-style folder: byte-level BPE with ChatML's special tokens, tokenizer_config.json with the
    template, config.json and generation_config.json with Qwen's ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": template, "model_max_length": 64}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ids = {name: tok.token_to_id(name) for name in SPECIALS}
    (path / "config.json").write_text(json.dumps({"bos_token_id": ids["<|endoftext|>"],
                                                  "eos_token_id": ids["<|im_end|>"]}))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return qwen_folder(tmp_path_factory.mktemp("qwen") / "model")


def hf_ids(result) -> list[int]:
    """apply_chat_template's ids: a list, or (transformers 5) a BatchEncoding holding them."""
    return list(result["input_ids"] if hasattr(result, "keys") else result)


def as_dicts(chat):
    return [{"role": role, "content": content} for role, content in chat]


def test_rendered_ids_equal_transformers_apply_chat_template(folder):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(folder))
    tokenizer = HFTokenizer.from_file(folder / "tokenizer.json")
    assert "own chat_template" in template_name(tokenizer)
    for chat in CHATS:
        ids, _ = render(chat, tokenizer)
        assert ids.tolist() == hf_ids(reference.apply_chat_template(as_dicts(chat), tokenize=True))
        prompt = reference.apply_chat_template(as_dicts(chat[:-1]), tokenize=True, add_generation_prompt=True)
        assert render_prompt(chat[:-1], tokenizer) == hf_ids(prompt)


def test_the_loss_mask_covers_exactly_the_answers_and_their_end_of_turn(folder):
    tokenizer = HFTokenizer.from_file(folder / "tokenizer.json")
    im_end = tokenizer.tok.token_to_id("<|im_end|>")
    for chat in CHATS:
        ids, mask = render(chat, tokenizer)
        # The masked tokens are, run by run, each answer's own tokens and one <|im_end|>.
        runs, current = [], []
        for token, masked in zip(ids.tolist(), mask.tolist(), strict=True):
            if masked:
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        answers = [content for role, content in chat if role == "assistant"]
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers, strict=True):
            assert run[-1] == im_end and tokenizer.decode(run[:-1]) == answer
    assert chat_stop_ids(tokenizer)[0] == im_end


def test_bos_eos_pad_come_from_the_folder_not_a_list(folder):
    tokenizer = HFTokenizer.from_file(folder / "tokenizer.json")
    ids = {name: tokenizer.tok.token_to_id(name) for name in SPECIALS}
    assert tokenizer.eos_id == ids["<|im_end|>"]  # tokenizer_config's eos, not the first well-known name
    assert tokenizer.bos_id == ids["<|endoftext|>"]  # config's bos_token_id; <|im_start|> is never taken for it
    assert tokenizer.pad_id == ids["<|endoftext|>"]
    assert tokenizer.stop_ids() == [ids["<|im_end|>"], ids["<|endoftext|>"]]


def test_a_template_marking_generation_blocks_masks_the_same(folder, tmp_path):
    marked = QWEN_TEMPLATE.replace(
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
        "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
        "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}")
    other = HFTokenizer.from_file(qwen_folder(tmp_path / "marked", marked) / "tokenizer.json")
    tokenizer = HFTokenizer.from_file(folder / "tokenizer.json")
    for chat in CHATS:
        ids, mask = render(chat, tokenizer)
        ids2, mask2 = render(chat, other)
        assert ids.tolist() == ids2.tolist() and mask.tolist() == mask2.tolist()


def test_special_tokens_in_a_content_and_bad_templates_are_one_line_errors(folder, tmp_path):
    tokenizer = HFTokenizer.from_file(folder / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"messages\[0\].content holds .*<\|im_start\|>"):
        render([("user", "x<|im_start|>system"), ("assistant", "y")], tokenizer)
    with pytest.raises(ConfigError, match="boom"):
        ChatTemplate("{{ raise_exception('boom') }}").render([("user", "x")])
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(ConfigError, match="more than"):  # output is bounded
        ChatTemplate("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}").render([("user", "x")])
    with pytest.raises(ConfigError, match="failed"):  # the sandbox refuses Python internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([("user", "x")])


def test_tokenizers_without_a_template_keep_the_built_in_one():
    tokenizer = ByteTokenizer()
    assert chat_template_of(tokenizer) is None and "built-in" in template_name(tokenizer)
    ids, mask = render([("user", "a"), ("assistant", "b")], tokenizer)
    assert bytes(ids.tolist()) == b"### User:\na\n\n### Assistant:\nb\x00"
    assert np.flatnonzero(mask).tolist() == [len(ids) - 2, len(ids) - 1]


def test_bad_side_files_are_one_line_errors(folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "eos_token": "</s>"}')
    with pytest.raises(ConfigError, match="tokenizer_config.json"):
        HFTokenizer.from_file(broken / "tokenizer.json")
    (broken / "tokenizer_config.json").write_text('{"eos_token": "<|nowhere|>"}')
    with pytest.raises(ConfigError, match="eos_token '<|nowhere|>' is not in the vocabulary"):
        HFTokenizer.from_file(broken / "tokenizer.json")
    (broken / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    (broken / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tokenizer = HFTokenizer.from_file(broken / "tokenizer.json")  # the .jinja file is the template
    assert tokenizer.chat_template.startswith("{% for m in messages %}[")


def test_sft_from_a_model_folder_then_export_keeps_its_template_and_ids(tmp_path):
    """The acceptance path: init-from a Llama folder with a Qwen-style template -> sft -> export; transformers renders
    the same chat text from the export, with the source's bos/eos ids (no <|im_start|> taken for bos)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llm.export import export_hf
    from llm.training.train import main as train_main

    folder = qwen_folder(tmp_path / "model")
    ids = {name: HFTokenizer.from_file(folder / "tokenizer.json").tok.token_to_id(name) for name in SPECIALS}
    generation = (folder / "generation_config.json").read_text()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "generation_config.json").write_text(generation)  # Qwen's: two ids end a turn
    run = tmp_path / "run"
    assert train_main(["--task", "sft", "--model-init-from", str(folder), "--data-num-samples", "16",
                       "--data-seq-len", "120", "--training-batch-size", "4", "--training-max-steps", "1",
                       "--training-precision", "fp32", "--training-callbacks", "MetricsLogger",
                       "--logging-log-dir", str(run)]) == 0
    assert "own chat_template" in (run / "train.log").read_text()
    out = export_hf(run, tmp_path / "export")
    source, exported = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(out))
    for chat in CHATS:
        assert exported.apply_chat_template(as_dicts(chat), tokenize=False) == \
            source.apply_chat_template(as_dicts(chat), tokenize=False)
    written = json.loads((out / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"]) == (ids["<|endoftext|>"], ids["<|im_end|>"])
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == json.loads(generation)[
        "eos_token_id"]
