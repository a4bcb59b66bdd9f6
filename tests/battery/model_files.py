"""Builders for the model-file batteries: tiny HF folders written with `save_hf` (no transformers import), tiny runs
written with checkpoint.py's own writers, and the one assertion every refusal makes (exit status 2, one line naming
what it must name, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml
from helpers import call_main

from llm import fs
from llm.artifacts import checkpoint as ckpt
from llm.models.decoder import DecoderModel
from llm.models.hf import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, save_hf
from llm.training.core.config import Config
from llm.training.train import main as train_main

SHAPE = dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
             max_seq_len=64)
MOE = dict(use_moe=True, num_experts=4, top_k=2, moe_intermediate_size=24)
TEXT = "def square(x):\n    return x * x\n\n" * 40


def tiny_model(seed: int = 0, **overrides: Any) -> DecoderModel:
    torch.manual_seed(seed)
    return DecoderModel(**{**SHAPE, **overrides})


def hf_folder(path: Path, *, shard_bytes: int | None = None, **overrides: Any) -> DecoderModel:
    """An HF Llama (or, with `MOE`, Mixtral) folder of a tiny random model, as `save_hf` writes it."""
    model = tiny_model(**overrides)
    save_hf(model, path, max_shard_bytes=shard_bytes)
    return model


def edit_json(path: Path, **changes: Any) -> None:
    """Set (or, with the value `...`, delete) top-level keys of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def init_from(tmp_path: Path, source: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m llm.training.train --model-init-from SOURCE` of a tiny lm run (eval-only), in this process."""
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    args = ["--task", "lm", "--model-init-from", str(source), "--data-path", str(tmp_path / "corpus.txt"),
            "--data-tokenizer", "byte", "--data-seq-len", "16", "--data-val-fraction", "0.3",
            "--data-cache-dir", str(tmp_path / "cache"), "--training-batch-size", "4", "--training-precision", "fp32",
            "--training-device", "cpu", "--training-callbacks", "MetricsLogger", "--logging-loggers", "jsonl",
            "--logging-log-dir", str(tmp_path / "run"), "--training-eval-only", *extra]
    return call_main(train_main, args, tmp_path)


def one_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The refusal: exit status 2 and exactly one `error:` line on stderr holding every needle; returns it."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def refused(tmp_path: Path, source: Path, *needles: str) -> str:
    """`init_from` is refused with one line holding the needles, and nothing was written: no run directory, no data
    cache, the source unchanged."""
    before = snapshot(source) if source.is_dir() else None
    line = one_line(init_from(tmp_path, source), *needles)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    if before is not None:
        assert snapshot(source) == before
    return line


def trainer_state(step: int) -> dict[str, Any]:
    """A trainer state of the engine's layout (`checkpoint.check_trainer_state`) that counts `step`."""
    return {"state": {"step": step}, "optimizer": None, "lr_schedule": {}, "data": {}, "callbacks": {},
            "rng": ckpt.rng_state()}


def lm_run(run: Path, model: DecoderModel | None = None, steps: tuple[int, ...] = (), **config_model: Any) -> Path:
    """A run directory written with checkpoint.py's writers: config.yaml (lm task, the model's shape, then
    `config_model` written over it as raw YAML values), final model.safetensors, and a checkpoint per step."""
    model = model or tiny_model()
    config = Config(task="lm")
    for key, value in SHAPE.items():
        setattr(config.model, key, value)
    data = config.to_dict()
    data["model"].update(config_model)
    text = yaml.safe_dump(data)
    run.mkdir(parents=True, exist_ok=True)
    (run / ckpt.CONFIG).write_text(text)
    ckpt.save_weights(model, run / ckpt.WEIGHTS)
    for step in steps:
        tmp = run / ckpt.CHECKPOINTS_DIR / f"{ckpt.TMP_PREFIX}{ckpt.step_dir_name(step)}"
        tmp.mkdir(parents=True)
        ckpt.save_checkpoint_weights(model, tmp / ckpt.WEIGHTS)
        ckpt.save_trainer_state(trainer_state(step), tmp / ckpt.trainer_state_name(0))
        fs.write_durable(tmp / ckpt.CONFIG, text.encode())
        ckpt.write_manifest(tmp, step, 1)
        ckpt.commit_checkpoint(tmp, run / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(step))
    return run


def copy_of(source: Path, to: Path) -> Path:
    shutil.copytree(source, to)
    return to


__all__ = ["CONFIG_NAME", "INDEX_NAME", "MOE", "SHAPE", "SINGLE_NAME", "copy_of", "edit_json", "hf_folder",
           "init_from", "lm_run", "one_line", "refused", "snapshot", "tiny_model", "trainer_state"]
