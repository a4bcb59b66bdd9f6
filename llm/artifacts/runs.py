"""Reading a run back: the one loader behind `llm.generate`, `llm.export` and the FSDP consolidation.

`resolve_run` decides which weights and config a path names (a run directory, a checkpoint directory or a
weights file; only ever a complete, verified checkpoint, never a `.tmp-*` or partial one) and `load_run` rebuilds
the decoder model, its config and tokenizer from them. The file format itself is checkpoint.py's.
`read_init_source` is what `model.init_from` and `llm.evaluate` name: a Hugging Face folder (read by
llm.models.init_from) or one of our runs, resolved by the same rule.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from llm import untrusted
from llm.artifacts import base_pin
from llm.artifacts.checkpoint import (
    CHECKPOINTS_DIR,
    CONFIG,
    FINAL_STEP_KEY,
    MANIFEST,
    SHARDED_DIR,
    SHARDED_METADATA,
    TMP_PREFIX,
    WEIGHTS,
    CheckpointError,
    checkpoint_step,
    find_latest_checkpoint,
    read_checkpoint_config,
    read_manifest,
    shape_mismatches,
    summarize_mismatches,
    verify_checkpoint,
)
from llm.artifacts.sharded import plain_errors, safe_load_planner, shard_reader
from llm.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from llm.errors import ConfigError, UserError
from llm.models.decoder import DecoderModel
from llm.models.init_from import (
    InitSource,
    init_error,
    is_hf_folder,
    layer_count_problem,
    load_init_weights,
    model_field_problem,
    model_fields,
    model_shape_problem,
    read_hf_source,
)
from llm.models.lora import is_adapter_key
from llm.registry import TASKS
from llm.training.core.config import Config, config_from_dict


def _trains_encoder(task: str) -> bool:
    """Whether a run's `task` trains an encoder with its own head, not a DecoderModel: the registered task class
    says so (`TrainingTask.model_kind`). The built-in tasks are registered by importing their package, named as a
    string: artifacts sit below training and need only this one fact of it. A task that is not registered here (a
    plugin's, or a `module:Class` not imported) is taken for a decoder, which loading its weights then checks."""
    importlib.import_module("llm.training.tasks")
    if task not in TASKS.names():
        return False
    return getattr(TASKS.get(task), "model_kind", "decoder") == "encoder"


# ---------------------------------------------------------------------------------------------
# Reading a run back: the one loader behind llm.generate, llm.export and the FSDP consolidation
# ---------------------------------------------------------------------------------------------

# Name parts a state dict picks up when saved from a wrapped model (torch.compile, activation checkpointing).
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.")


@dataclass(frozen=True)
class RunFiles:
    """Which files of a run `resolve_run` chose."""

    weights: Path  # a safetensors file, or a checkpoint's `sharded/` (torch.distributed.checkpoint) directory
    config: Path | None  # the config.yaml that rebuilds the model (None: there is none)
    run_dir: Path
    checkpoint_dir: Path | None  # the checkpoint the weights belong to (None: a run's final or loose weights)

    @property
    def sharded(self) -> bool:
        return self.weights.is_dir()

    @property
    def search_dirs(self) -> list[Path]:
        """Where the tokenizer files may be: next to the weights first, then in the run directory."""
        here = self.checkpoint_dir or self.weights.parent
        return [here] if here == self.run_dir else [here, self.run_dir]


@dataclass
class LoadedRun:
    """A run read back by `load_run`: its config, its model with the weights loaded, its tokenizer."""

    config: Config
    model: DecoderModel
    tokenizer: Tokenizer | None  # None when load_run was asked not to load it
    weights_path: Path
    checkpoint_dir: Path | None
    run_dir: Path


def _warn(message: str) -> None:
    logging.getLogger("llm").warning(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_checkpoint_dir(path: Path) -> bool:
    return checkpoint_step(path) is not None or (path / MANIFEST).is_file()


def _run_dir_of(holder: Path) -> Path:
    # A checkpoint sits at RUN/checkpoints/step-X/; anything else holds its own run's files.
    return holder.parent.parent if holder.parent.name == CHECKPOINTS_DIR else holder


def _files(weights: Path, holder: Path, checkpoint_dir: Path | None) -> RunFiles:
    run_dir = _run_dir_of(holder)
    config = next((d / CONFIG for d in (holder, run_dir) if (d / CONFIG).is_file()), None)
    return RunFiles(weights, config, run_dir, checkpoint_dir)


def _checkpoint_files(ckpt_dir: Path) -> RunFiles:
    if (ckpt_dir / WEIGHTS).is_file():
        return _files(ckpt_dir / WEIGHTS, ckpt_dir, ckpt_dir)
    if (ckpt_dir / SHARDED_METADATA).is_file():
        return _files(ckpt_dir / SHARDED_DIR, ckpt_dir, ckpt_dir)
    raise CheckpointError(f"checkpoint: {ckpt_dir} holds neither {WEIGHTS} nor {SHARDED_DIR}/")


def final_weights_step(path: Path) -> int | None:
    """The step a run's final weights were saved at, when the file records it (see `save_weights`)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})[FINAL_STEP_KEY])
    except (KeyError, ValueError, OSError, SafetensorError):
        return None


def resolve_run(
    path: str | os.PathLike, *, verify: bool = True, warn: Callable[[str], None] | None = None
) -> RunFiles:
    """Which weights, config and tokenizer directories a run, checkpoint or weights path names.

    - A weights file (`model.safetensors`): itself; inside a checkpoint directory that checkpoint must verify.
    - A checkpoint directory (`step-*`, or anything with a manifest), or its `sharded/` folder: it must verify
      against its manifest (`verify_checkpoint`); a failing one is an error, never a silent fallback.
    - A run directory: its final `model.safetensors`, unless the file records its step and a newer checkpoint
      verifies (the run was resumed after it was written); without a final file, the newest checkpoint that
      verifies, each broken one skipped with a `warn`ing. `RUN/checkpoints` means the same minus the final file.
    `.tmp-*` directories (a save in progress, or left by a crash) are never chosen, nor accepted when named.
    The config is the `config.yaml` next to the weights, else the run directory's. `verify=False` skips the
    checksums (a manifest must still exist for a checkpoint to be chosen from a run directory).
    """
    path, warn = Path(path), warn or _warn
    check = verify_checkpoint if verify else read_manifest
    if not path.exists():
        raise CheckpointError(f"checkpoint: no such file or directory: {str(path)!r}")
    if not path.is_file() and not path.is_dir():  # a FIFO or a device: never opened
        raise CheckpointError(f"checkpoint: {str(path)!r} is not a regular file or a directory "
                              f"({untrusted.kind_of(path.stat().st_mode)})")
    shards = path.is_dir() and (path / ".metadata").is_file()  # a torch.distributed.checkpoint directory
    holder = path.parent if path.is_file() or (shards and path.name == SHARDED_DIR) else path
    if holder.name.startswith(TMP_PREFIX):
        raise CheckpointError(
            f"checkpoint: {holder} is an incomplete checkpoint (a save in progress, or left by a crash); "
            "name a step-* directory or the run directory"
        )
    if path.is_file():
        if _is_checkpoint_dir(holder):
            check(holder)
            return _files(path, holder, holder)
        return _files(path, holder, None)
    if shards and path.name != SHARDED_DIR:  # shards saved outside the checkpoint layout
        return _files(path, holder, None)
    if _is_checkpoint_dir(holder):
        check(holder)
        return _checkpoint_files(holder)
    root = holder if holder.name == CHECKPOINTS_DIR else holder / CHECKPOINTS_DIR  # RUN or RUN/checkpoints
    if (holder / WEIGHTS).is_file():
        step = final_weights_step(holder / WEIGHTS)
        newer = None if step is None else find_latest_checkpoint(root, warn, after=step, check=check)
        return _checkpoint_files(newer) if newer else _files(holder / WEIGHTS, holder, None)
    if (holder / SHARDED_METADATA).is_file():  # shards outside a checkpoint (no manifest to check them by)
        return _files(holder / SHARDED_DIR, holder, None)
    latest = find_latest_checkpoint(root, warn, check=check)
    if latest is None:
        raise CheckpointError(
            f"checkpoint: {str(path)!r} holds no {WEIGHTS} and no complete checkpoint under {CHECKPOINTS_DIR}/"
        )
    return _checkpoint_files(latest)


def _read_config(files: RunFiles) -> Config:
    if files.config is None:
        raise CheckpointError(f"checkpoint: no {CONFIG} next to {files.weights} or in its run directory")
    data = read_checkpoint_config(files.config)  # capped, plain YAML (a tag that builds objects is refused)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint: {files.config}: {exc}") from None


def read_run_config(path: str | os.PathLike) -> Config:
    """The `Config` of a run, checkpoint or weights path (resolved as `resolve_run` does), or of a config.yaml."""
    path = Path(path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _read_config(RunFiles(path, path, path.parent, None))
    return _read_config(resolve_run(path, verify=False))


def load_sharded_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded (FSDP) checkpoint, read in this one process (no process group).

    Read through fsdp.py's `shard_reader` and `safe_load_planner`: nothing in the directory can run code.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"checkpoint: {directory} is not a sharded (torch.distributed.checkpoint) directory")
    reader = shard_reader(directory)
    metadata = reader.read_metadata()  # CheckpointError for anything but sound DCP metadata
    prefix = "model."
    try:
        state = {
            key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
        }
        if not state:
            raise CheckpointError(f"checkpoint: {directory} holds no model weights")
        wrapped = {"model": state}
        with warnings.catch_warnings(), plain_errors("reading the shards"):
            # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wrapped, storage_reader=reader, planner=safe_load_planner(), no_dist=True)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise CheckpointError(f"checkpoint: cannot read the shards in {directory}: {_first_line(exc)}") from None
    return wrapped["model"]


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own tensor names, without what torch.compile, activation checkpointing or DDP add."""
    for part in _WRAPPER_PARTS:
        state = {k.replace(part, ""): v for k, v in state.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_weights(files: RunFiles, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The chosen weights as a state dict with the model's own names (shards are read on the CPU)."""
    if files.sharded:
        return strip_wrapper_prefixes(load_sharded_weights(files.weights))
    try:
        state = load_file(str(files.weights), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:  # truncated, corrupt or not safetensors
        raise CheckpointError(f"checkpoint: cannot read {files.weights}: {_first_line(exc)}") from None
    return strip_wrapper_prefixes(state)


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, in the model's own names (no tensor data read)."""
    try:
        untrusted.check_regular(path)
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except untrusted.UntrustedFileError as exc:
        raise CheckpointError(f"checkpoint: {path} {exc.why}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {path}: {_first_line(exc)}") from None
    return strip_wrapper_prefixes(shapes)


def _build_decoder(config: Config, state: dict[str, torch.Tensor], files: RunFiles) -> DecoderModel:
    """DecoderModel from the config's `model` section, vocabulary size from the weights, weights checked."""
    embedding = state.get("embed_tokens.weight", state.get("lm_head.weight"))
    if embedding is None:
        raise CheckpointError(
            f"checkpoint: {files.weights} holds no decoder language model (task {config.task!r}); "
            "generate and export take lm runs"
        )
    kwargs = {**dataclasses.asdict(config.model), "vocab_size": embedding.shape[0]}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    problem = model_field_problem(model_fields(config.model)) or layer_count_problem(kwargs, shapes)
    if problem:  # before the probe below: a config claiming 10**12 layers must not be built, even on meta
        raise CheckpointError(f"checkpoint: {files.weights} does not match its config {files.config}: {problem}")
    try:
        with torch.device("meta"):  # shapes and names only: nothing is allocated or initialised
            probe = DecoderModel(**kwargs)
    except (TypeError, ValueError, AssertionError, UserError) as exc:
        raise CheckpointError(f"checkpoint: invalid model config in {files.config}: {_first_line(exc)}") from None
    embed, head = state.get("embed_tokens.weight"), state.get("lm_head.weight")
    if config.model.tie_embeddings and embed is not None and head is not None and not torch.equal(embed, head):
        raise CheckpointError(f"checkpoint: {files.weights} holds an lm_head.weight that differs from "
                              f"embed_tokens.weight, but its config {files.config} says model.tie_embeddings: true "
                              "(one matrix): which one is meant?")
    problems = shape_mismatches(probe, {k: list(v.shape) for k, v in state.items()})
    if problems:
        raise CheckpointError(
            f"checkpoint: {files.weights} does not match its config {files.config}: {summarize_mismatches(problems)}"
        )
    return DecoderModel.from_state_dict(state, **kwargs)


def _merge_lora_checkpoint(config: Config, state: dict[str, torch.Tensor], files: RunFiles,
                           warn: Callable[[str], None] | None = None) -> DecoderModel:
    """The plain model of a LoRA run's checkpoint: its base (in the checkpoint, or rebuilt from `model.init_from`
    when the checkpoint holds only the adapters, and then refused unless it is the base the adapters were trained
    on: llm.artifacts.base_pin) with the adapters merged in."""
    from llm.models.lora import apply_lora, merged_model

    t = config.training
    fields = {k: v for k, v in dataclasses.asdict(config.model).items() if k not in ("preset", "init_from")}
    problem = model_field_problem(model_fields(config.model)) or layer_count_problem(
        fields, {k: tuple(v.shape) for k, v in state.items()})
    if problem:  # before the model is built for real below
        raise CheckpointError(f"checkpoint: {files.weights} does not match its config {files.config}: {problem}")
    adapters_only = not any(k.endswith("base_layer.weight") for k in state)
    if adapters_only and not config.model.init_from:
        raise CheckpointError(f"checkpoint: {files.weights} holds LoRA adapters without their base and its config "
                              f"{files.config} names no model.init_from to rebuild the base from")
    model = apply_lora(DecoderModel(**fields), rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout,
                       targets=t.lora_targets, adapters_only=adapters_only,
                       variant=getattr(t, "lora_variant", "lora"))
    if adapters_only:
        load_init_from(model, config.model.init_from)
        manifest = read_manifest(files.checkpoint_dir) if files.checkpoint_dir is not None else None
        base_pin.check(manifest, model, files.checkpoint_dir or files.weights, warn or _warn)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint: {files.weights} does not match its config {files.config}: "
                              f"{_first_line(exc)}") from None
    return merged_model(model)


def load_run(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    verify: bool = True, tokenizer: bool = True, warn: Callable[[str], None] | None = None,
) -> LoadedRun:
    """Config, DecoderModel (weights loaded, eval mode) and tokenizer of a run, checkpoint or weights file.

    Which weights are chosen is `resolve_run`'s rule. `dtype=None` keeps the stored dtype. Only decoder
    language models load (the `regression` and `classification` tasks train encoders); every problem is a
    one-line `CheckpointError`/`UserError` naming the path.
    """
    files = resolve_run(path, verify=verify, warn=warn)
    config = _read_config(files)
    if _trains_encoder(config.task):
        raise CheckpointError(
            f"checkpoint: {files.config} is a {config.task!r} run, not a decoder language model "
            "(generate and export take lm runs)"
        )
    state = read_weights(files, device)
    if any(is_adapter_key(k) for k in state):
        model = _merge_lora_checkpoint(config, state, files, warn)
    else:
        model = _build_decoder(config, state, files)
    model = model.to(device=device, dtype=dtype).eval()
    tok = load_tokenizer(config.data.tokenizer, files.search_dirs) if tokenizer else None
    if tok is not None and tok.vocab_size > model.embed_tokens.num_embeddings:
        raise CheckpointError(
            f"checkpoint: the tokenizer found for {files.run_dir} has {tok.vocab_size} ids, more than the model's "
            f"{model.embed_tokens.num_embeddings}: it is not the tokenizer this model was trained with"
        )
    return LoadedRun(config, model, tok, files.weights, files.checkpoint_dir, files.run_dir)


# ---------------------------------------------------------------------------------------------
# Starting from existing weights: model.init_from, llm.evaluate
# ---------------------------------------------------------------------------------------------


def _run_tokenizer(config: Config, files: RunFiles) -> str:
    """The tokenizer a run was trained with: `byte`, or the path of its tokenizer.json ("" when it is gone)."""
    if config.data.tokenizer == "byte":
        return "byte"
    found = next((d / TOKENIZER_FILE for d in files.search_dirs if (d / TOKENIZER_FILE).is_file()), None)
    if found is None and config.data.tokenizer != "bpe" and os.path.isfile(config.data.tokenizer):
        found = Path(config.data.tokenizer)
    return str(found) if found is not None else ""


def read_init_source(path: str | os.PathLike) -> InitSource:
    """The `InitSource` of a Hugging Face Llama/Mixtral folder, or of a run, checkpoint or weights path of ours
    (the weights `resolve_run` chooses; a LoRA checkpoint's adapters merged into its base, as `load_run` does).
    Every problem is one `InitFromError` line naming model.init_from."""
    path = Path(path)
    if not path.exists():
        raise init_error(path, "does not exist")
    if is_hf_folder(path):
        return read_hf_source(path)
    try:
        files = resolve_run(path)
        config = _read_config(files)
    except CheckpointError as exc:
        raise init_error(path, f"is neither a Hugging Face Llama/Mixtral folder (no config.json) nor a usable run "
                               f"or checkpoint ({_first_line(exc)})") from None
    if _trains_encoder(config.task):
        raise init_error(path, f"is a {config.task!r} run, not a decoder language model")
    fields = model_fields(config.model)
    problem = model_field_problem(fields)
    if problem is None and not files.sharded:  # the headers of the weights against the config (no tensor data)
        try:
            shapes = _header_shapes(files.weights)
        except CheckpointError as exc:
            raise init_error(path, f"has weights that cannot be read ({_first_line(exc)})") from None
        if not any(is_adapter_key(k) for k in shapes):  # a LoRA run's base is checked when it is rebuilt
            problem = model_shape_problem(fields, shapes)
    if problem:
        raise init_error(path, f"has a {CONFIG} ({files.config}) that disagrees with its weights "
                               f"({files.weights.name}) or is out of range: {problem}")

    def read() -> dict[str, torch.Tensor]:
        state = read_weights(files)
        if any(is_adapter_key(k) for k in state):  # a LoRA checkpoint: its plain model, merged as load_run merges it
            return _merge_lora_checkpoint(config, state, files).state_dict()
        return state

    return InitSource(path, "run", model_fields(config.model), _run_tokenizer(config, files), read,
                      config.data.seq_len, config.training.precision)


def load_init_from(model: torch.nn.Module, path: str | os.PathLike) -> InitSource:
    """Copy the weights `path` names (see `read_init_source`) into `model`: the engine's `model.init_from` step."""
    source = read_init_source(path)
    count = load_init_weights(model, source)
    logging.getLogger("llm").info("model.init_from: loaded %d tensors from %s", count, source.path)
    return source
