"""Issue 22, kind 1, for model and artifact files: a file that disagrees with itself, or with the files beside it,
is never resolved silently. Either the content is believed (and the result is exactly the content's) or the run,
export or load is refused with one line naming both sides, before anything is written.

HF folders: config.json against itself (architectures/model_type, rope_theta twice, head_dim, a repeated key) and
against the weights (layer and expert counts, every tensor's shape, the tie flag against lm_head), the shard index
against the shards. Our runs: a checkpoint directory's name against its manifest's step and the trainer state's
step, a run's config.yaml against its weights (tie flag included), the run's config.yaml against a checkpoint's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import call_main
from safetensors.torch import load_file, save_file

from battery.model_files import (
    CONFIG_NAME,
    INDEX_NAME,
    MOE,
    SINGLE_NAME,
    copy_of,
    edit_json,
    hf_folder,
    init_from,
    lm_run,
    one_line,
    refused,
    snapshot,
    tiny_model,
    trainer_state,
)
from llm.artifacts import checkpoint as ckpt
from llm.artifacts.checkpoint import CheckpointError
from llm.artifacts.runs import load_run
from llm.export import main as export_main
from llm.models.hf import load_hf

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    hf_folder(root / "llama")
    hf_folder(root / "tied", tie_embeddings=True)
    hf_folder(root / "sharded", shard_bytes=20_000)
    hf_folder(root / "mixtral", **MOE)
    return root


@pytest.fixture
def folder(pristine: Path, tmp_path: Path, request) -> Path:
    return copy_of(pristine / request.param, tmp_path / "hf")


def same_model(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def edit_weights(folder: Path, change, name: str = SINGLE_NAME) -> None:
    state = load_file(folder / name)
    change(state)
    save_file(state, folder / name)


# -------------------------------------------------------------------------------------------- config.json vs itself
SELF = {
    "architectures-vs-model-type": (dict(architectures=["MixtralForCausalLM"]),
                                    "config.json that disagrees with itself: architectures names MixtralForCausalLM "
                                    "but model_type is 'llama'"),
    "rope-theta-twice": (dict(rope_theta=500.0), "config.json that disagrees with itself: rope_theta is 500.0 and "
                                                 "rope_parameters.rope_theta is 10000.0"),
    "head-dim": (dict(head_dim=16), "unsupported head_dim 16 != hidden_size / num_attention_heads (32 / 4)"),
}


@pytest.mark.parametrize("folder", ["llama"], indirect=True)
@pytest.mark.parametrize("changes, message", SELF.values(), ids=SELF.keys())
def test_a_config_json_that_says_two_things_is_refused(folder, tmp_path, changes, message):
    edit_json(folder / CONFIG_NAME, **changes)
    refused(tmp_path, folder, f"model.init_from: '{folder}'", message)


# -------------------------------------------------------------------------------------------- config.json vs weights
AGAINST_WEIGHTS = {
    "more-layers": (dict(num_hidden_layers=3), "num_hidden_layers is 3 but weights for 2 layer(s) (numbered up to 1)"),
    "fewer-layers": (dict(num_hidden_layers=1), "num_hidden_layers is 1 but weights for 2 layer(s)"),
    "a-billion-layers": (dict(num_hidden_layers=10**9), "num_hidden_layers is 1000000000 but weights for 2 layer(s)"),
    "hidden-size": (dict(hidden_size=64, head_dim=None),
                    "has embed_tokens.weight of shape (256, 32) but its config.json implies (256, 64)"),
    "vocab-size": (dict(vocab_size=300), "has embed_tokens.weight of shape (256, 32) but its config.json implies "
                                         "(300, 32)"),
    "intermediate-size": (dict(intermediate_size=64), "has layers.0.mlp.gate_proj.weight of shape (48, 32) but its "
                                                      "config.json implies (64, 32)"),
    "kv-heads": (dict(num_key_value_heads=4), "has layers.0.self_attn.k_proj.weight of shape (16, 32) but its "
                                              "config.json implies (32, 32)"),
    "untied-flag-without-lm-head": (dict(tie_word_embeddings=False), "tie_word_embeddings is false (or unset) but "
                                                                     "weights without lm_head.weight"),
    "unset-flag-without-lm-head": (dict(tie_word_embeddings=...), "tie_word_embeddings is false (or unset)"),
}


@pytest.mark.parametrize("changes, message", AGAINST_WEIGHTS.values(), ids=AGAINST_WEIGHTS.keys())
def test_a_config_json_that_disagrees_with_the_weights_is_refused(pristine, tmp_path, changes, message):
    tied = "tie_word_embeddings" in changes  # those cases start from a tied model (no lm_head in the file)
    folder = copy_of(pristine / ("tied" if tied else "llama"), tmp_path / "hf")
    edit_json(folder / CONFIG_NAME, **changes)
    refused(tmp_path, folder, f"model.init_from: '{folder}'", message)
    with pytest.raises(ValueError, match="'.*hf' "):  # the library loader refuses alike
        load_hf(folder)


@pytest.mark.parametrize("folder", ["tied"], indirect=True)
def test_tied_flag_with_a_different_lm_head_is_refused(folder, tmp_path):
    edit_weights(folder, lambda s: s.__setitem__(HEAD, s[EMBED] + 1.0))
    refused(tmp_path, folder, "tie_word_embeddings is true but an lm_head.weight that differs from the embedding")


@pytest.mark.parametrize("folder", ["tied"], indirect=True)
def test_tied_flag_with_an_equal_lm_head_is_believed(folder, tmp_path):
    """Older exporters store a tied matrix under both names: equal copies agree, and the model is the tied one."""
    edit_weights(folder, lambda s: s.__setitem__(HEAD, s[EMBED].clone()))
    loaded = load_hf(folder)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert same_model(loaded, tiny_model(tie_embeddings=True))
    assert init_from(tmp_path, folder).returncode == 0


@pytest.mark.parametrize("folder", ["llama"], indirect=True)
def test_torch_dtype_is_a_note_the_tensors_are_believed(folder):
    """config.json's torch_dtype says float16, the tensors are float32: the model is the tensors' (no silent cast)."""
    edit_json(folder / CONFIG_NAME, torch_dtype="float16", dtype="float16")
    loaded = load_hf(folder)
    assert loaded.embed_tokens.weight.dtype == torch.float32
    assert same_model(loaded, tiny_model())


TENSORS = {
    "unexpected-layer-tensor": (lambda s: s.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)),
                                "holds layers.0.mlp.extra.weight (and 0 more), which its config.json has no place for"),
    "foreign-tensor": (lambda s: s.__setitem__("vision_tower.weight", torch.zeros(2)),
                       "holds an unexpected tensor 'vision_tower.weight' for a Llama/Mixtral model"),
    "missing-norm": (lambda s: s.pop("model.norm.weight"), "lacks the weight norm.weight that its config.json implies"),
}


@pytest.mark.parametrize("folder", ["llama"], indirect=True)
@pytest.mark.parametrize("change, message", TENSORS.values(), ids=TENSORS.keys())
def test_tensors_the_config_has_no_place_for_or_lacks_are_refused(folder, tmp_path, change, message):
    edit_weights(folder, change)
    refused(tmp_path, folder, message)


def _drop_w2(state: dict) -> None:
    del state["model.layers.1.block_sparse_moe.experts.2.w2.weight"]


MIXTRAL = {
    "fewer-experts-in-config": (lambda f: edit_json(f / CONFIG_NAME, num_local_experts=3, num_experts_per_tok=2),
                                "holds 4 expert(s) in layer 0 (numbered up to 3) but its config.json has "
                                "num_local_experts 3"),
    "incomplete-expert": (lambda f: edit_weights(f, _drop_w2), "incomplete per-expert weights in layer 1: expert 2 "
                                                               "needs w1, w2 and w3"),
}


@pytest.mark.parametrize("folder", ["mixtral"], indirect=True)
@pytest.mark.parametrize("spoil, message", MIXTRAL.values(), ids=MIXTRAL.keys())
def test_mixtral_experts_that_disagree_with_the_config_are_refused(folder, tmp_path, spoil, message):
    spoil(folder)
    refused(tmp_path, folder, message)


# -------------------------------------------------------------------------------------------- index vs shards
def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


def _shards(folder: Path) -> list[str]:
    return sorted(set(_index(folder)["weight_map"].values()))


def _duplicate_key(folder: Path) -> None:
    text = (folder / INDEX_NAME).read_text()
    first = _shards(folder)[0]
    (folder / INDEX_NAME).write_text(text.replace('"weight_map": {', f'"weight_map": {{"{HEAD}": "{first}", ', 1))


def _in_two_shards(folder: Path) -> None:
    a, b = _shards(folder)[:2]
    moved = next(k for k, v in _index(folder)["weight_map"].items() if v == a)
    edit_weights(folder, lambda s: s.__setitem__(moved, load_file(folder / a)[moved]), name=b)


def _index_points_elsewhere(folder: Path) -> None:
    index = _index(folder)
    values = list(index["weight_map"].values())
    a = max(_shards(folder), key=values.count)  # a shard that stays listed once one of its tensors moves
    b = next(name for name in _shards(folder) if name != a)
    name = next(k for k, v in index["weight_map"].items() if v == a)
    index["weight_map"][name] = b
    (folder / INDEX_NAME).write_text(json.dumps(index))


def _index_lists_a_ghost(folder: Path) -> None:
    index = _index(folder)
    index["weight_map"]["model.layers.0.ghost.weight"] = _shards(folder)[0]
    (folder / INDEX_NAME).write_text(json.dumps(index))


def _unlisted(folder: Path) -> None:
    index = _index(folder)
    del index["weight_map"]["model.norm.weight"]
    (folder / INDEX_NAME).write_text(json.dumps(index))


INDEX = {
    "names-a-tensor-twice": (_duplicate_key, "repeats the key 'lm_head.weight' in one object"),
    "tensor-in-two-shards": (_in_two_shards, "twice, in model-00001-of-"),
    "index-points-elsewhere": (_index_points_elsewhere, "but its model.safetensors.index.json puts it in "),
    "index-lists-a-ghost": (_index_lists_a_ghost, "lists 'model.layers.0.ghost.weight' in 'model-00001-of-"),
    "shard-holds-an-unlisted-tensor": (_unlisted, "has 'model.norm.weight' in model-0000"),
}


@pytest.mark.parametrize("folder", ["sharded"], indirect=True)
@pytest.mark.parametrize("spoil, message", INDEX.values(), ids=INDEX.keys())
def test_an_index_that_disagrees_with_its_shards_is_refused(folder, tmp_path, spoil, message):
    spoil(folder)
    refused(tmp_path, folder, f"model.init_from: '{folder}'", message)


@pytest.mark.parametrize("folder", ["llama"], indirect=True)
def test_two_loose_files_holding_one_tensor_are_refused(folder, tmp_path):
    """Without an index every *.safetensors is read: a tensor in two of them is a question, not the last one read."""
    state = load_file(folder / SINGLE_NAME)
    (folder / SINGLE_NAME).unlink()
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, folder / "a.safetensors")
    save_file({"model.norm.weight": state["model.norm.weight"] * 2, EMBED: state[EMBED]}, folder / "b.safetensors")
    refused(tmp_path, folder, f"holds '{EMBED}' twice, in a.safetensors and b.safetensors")


# -------------------------------------------------------------------------------------------- our runs
def test_a_checkpoint_named_for_another_step_is_refused_by_name_and_skipped_by_auto(tmp_path):
    run = lm_run(tmp_path / "run", steps=(2, 4))
    (run / ckpt.WEIGHTS).unlink()  # the run's newest weights are then its newest checkpoint
    renamed = run / "checkpoints" / "step-00000006"
    (run / "checkpoints" / "step-00000004").rename(renamed)
    before = snapshot(run)
    result = call_main(export_main, [str(renamed), "--to", "hf", str(tmp_path / "out")], tmp_path)
    one_line(result, f"{renamed} is named for step 6 but its manifest.json records step 4")
    assert not (tmp_path / "out").exists() and snapshot(run) == before
    warned: list[str] = []
    loaded = load_run(run, warn=warned.append, tokenizer=False)
    assert loaded.checkpoint_dir.name == "step-00000002"
    assert len(warned) == 1 and "is named for step 6 but its manifest.json records step 4" in warned[0]


def test_a_trainer_state_counting_another_step_than_its_manifest_is_refused(tmp_path):
    run = lm_run(tmp_path / "run", steps=(2, 4))
    step4 = run / "checkpoints" / "step-00000004"
    ckpt.inspect_checkpoint(step4)  # sound as written
    ckpt.save_trainer_state(trainer_state(3), step4 / ckpt.trainer_state_name(0))  # well-formed, one step behind
    manifest = json.loads((step4 / ckpt.MANIFEST).read_text())
    name = ckpt.trainer_state_name(0)
    manifest["files"][name] = {"sha256": ckpt.sha256_file(step4 / name), "bytes": (step4 / name).stat().st_size}
    (step4 / ckpt.MANIFEST).write_text(json.dumps(manifest))  # re-hashed: only the content can tell
    with pytest.raises(CheckpointError, match="trainer_state_rank0.pt counts step 3 but the manifest.json records "
                                              "step 4"):
        ckpt.inspect_checkpoint(step4)
    warned: list[str] = []
    assert ckpt.find_latest_checkpoint(step4.parent, warned.append, check=ckpt.inspect_checkpoint).name == \
        "step-00000002"
    assert len(warned) == 1 and "counts step 3" in warned[0]


def test_a_source_runs_config_that_disagrees_with_its_weights_is_refused(tmp_path):
    source = lm_run(tmp_path / "source", hidden_size=48)
    refused(tmp_path, source, "the model implies embed_tokens.weight of shape (256, 48) but the weights hold "
                              "(256, 32)")


def test_a_tied_config_over_two_different_matrices_is_refused(tmp_path):
    """config.yaml says tie_embeddings, the weights hold two different matrices: init-from and export both refuse
    (today export silently kept the embedding and dropped the output layer)."""
    source = lm_run(tmp_path / "source", tie_embeddings=True)
    refused(tmp_path, source, "model.tie_embeddings is true but the weights hold embed_tokens.weight and "
                              "lm_head.weight separately")
    result = call_main(export_main, [str(source), "--to", "hf", str(tmp_path / "out")], tmp_path)
    one_line(result, "holds an lm_head.weight that differs from embed_tokens.weight, but its config",
             "model.tie_embeddings: true")
    assert not (tmp_path / "out").exists()


def test_the_checkpoints_own_config_is_believed_over_the_runs(tmp_path, caplog):
    """A run's config.yaml (hidden 48, e.g. rewritten for a later run) disagrees with its checkpoint's (hidden 32,
    the shape of the checkpoint's weights): the checkpoint's config is the one that describes those weights."""
    model = tiny_model(seed=3)
    run = lm_run(tmp_path / "run", model, steps=(2,))
    (run / ckpt.WEIGHTS).unlink()
    text = (run / ckpt.CONFIG).read_text().replace("hidden_size: 32", "hidden_size: 48")
    assert "hidden_size: 48" in text
    (run / ckpt.CONFIG).write_text(text)
    with caplog.at_level(logging.WARNING, logger="llm"):
        loaded = load_run(run, tokenizer=False)
    assert loaded.config.model.hidden_size == 32 and same_model(loaded.model, model)
    assert call_main(export_main, [str(run), "--to", "hf", str(tmp_path / "out")], tmp_path).returncode == 0
    assert same_model(load_hf(tmp_path / "out"), model)
