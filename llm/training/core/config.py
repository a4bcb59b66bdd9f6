"""Run configuration: plain dataclass sections composed in `Config`.

Precedence is defaults < task defaults < `--config file.yaml` < CLI flags. CLI flags are generated
from these dataclasses (`--<section>-<field>`, see `cli.py`); the trailing comment of each field is
its `--help` text, so keep them short and true. Every value is checked in `validate_config` before
any work starts; an error names the field, the bad value and what is valid.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

import yaml

from llm.config import MODES, Freezable, ResumePolicy, for_tasks, on_resume
from llm.config import resume_policy as _resume_policy
from llm.config import resume_tables as _resume_tables

# The field machinery moved to llm.config; the CLI, the tests and user code read it through this module too.
from llm.config.fields import (  # noqa: F401
    append_or_replace,
    coerce,
    field_help,
    field_types,
    type_name,
    unwrap_optional,
)
from llm.config.yaml_file import MAX_YAML_BYTES, load_yaml  # noqa: F401
from llm.errors import ConfigError, did_you_mean, invalid, shorten, show
from llm.models.config import ModelConfig  # the model section is the model's own config
from llm.models.lora import DEFAULT_TARGETS as LORA_TARGETS
from llm.models.lora import EXPERT_TARGETS as LORA_EXPERT_TARGETS
from llm.models.lora import QUANTIZERS as LORA_QUANTIZERS
from llm.models.lora import VARIANTS as LORA_VARIANTS
from llm.models.lora import check_quantize as check_lora_quantize
from llm.models.lora import require_peft
from llm.training.optim.precision import PRECISIONS

NAN_POLICIES = ("raise", "skip")
SPIKE_POLICIES = ("off", "rollback")
INTERVALS = ("step", "epoch")
STRATEGIES = ("ddp", "fsdp", "hsdp")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class DataConfig(Freezable):
    """Where the data comes from and how it is cut into batches."""

    path: str = ""  # file, directory, glob, .jsonl, .csv or .bin; empty = the task's embedded default
    module: str = ""  # data module name or package.module:Class; empty = the task's default
    seq_len: int = 256  # tokens per training window (lm) or sequence length (regression)
    tokenizer: str = "byte"  # byte | bpe (trained on the corpus) | path/to/tokenizer.json
    vocab_size: int = 4096  # vocabulary size when training a BPE tokenizer
    max_bytes: int = 16_000_000  # cap on the embedded corpus size in bytes (0 = no cap)
    max_file_bytes: int = 0  # refuse data files larger than this, in bytes (0 = no cap; files are streamed)
    text_field: str = "text"  # JSONL field / Parquet or Arrow column holding the text
    prepare_workers: int = 0  # tokenizer processes when preparing a large corpus (0 = one per core)
    bpe_sample_bytes: int = 100_000_000  # bytes of text a BPE tokenizer is trained on (0 = all)
    val_fraction: float = 0.05  # share of the data held out for validation
    num_samples: int = 4096  # samples of the synthetic regression data set
    num_workers: int = 0  # DataLoader worker processes
    cache_dir: str = ""  # token cache directory (default: ~/.cache/llm)
    sampling: str = "random"  # lm windows: random (shuffled, new cut each epoch) | sequential
    # Packing and document masks (issue 21; README "Packing and document masks")
    packing: bool = field(default=False, metadata=for_tasks("sft"))  # pack examples into full rows, none seeing another
    document_mask: bool = field(default=False, metadata=for_tasks("lm"))  # attention never crosses an EOS boundary


@dataclass
class TrainingConfig(Freezable):
    """Optimization, schedule, precision and the callbacks of a run."""

    lr: float = field(
        default=1e-3, metadata=on_resume("applied", "the schedule's peak lr (its position is kept)")
    )  # peak learning rate
    epochs: int = field(
        default=10, metadata=on_resume("applied", "the schedule's horizon")
    )  # passes over the data (max_steps, when set, ends the run earlier)
    max_steps: int = field(
        default=0, metadata=on_resume("applied", "the schedule's horizon")
    )  # stop after this many optimizer steps (0 = no limit)
    batch_size: int = 32  # samples per process per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    optimizer: str = field(
        default="adamw", metadata=on_resume("refused", "--training-optimizer")
    )  # adamw | adam | muon (Muon for hidden matrices + AdamW) | sgd | package.module:Class
    weight_decay: float = 0.0  # decoupled weight decay (never applied to norms, biases, embeddings)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam betas
    momentum: float = 0.9  # SGD momentum
    muon_lr_scale: float = 8.0  # muon: hidden matrices' lr / lr (RMS-matched to AdamW)
    scheduler_type: str = field(
        default="cosine", metadata=on_resume("refused", "--training-scheduler-type")
    )  # cosine, step, plateau, exponential, linear, constant, wsd, none
    scheduler_interval: str = field(
        default="step", metadata=on_resume("refused", "--training-scheduler-interval")
    )  # step the scheduler per optimizer 'step' or per 'epoch'
    step_size: int = 30  # StepLR period (in scheduler intervals)
    gamma: float = 0.1  # StepLR/ExponentialLR decay factor
    warmup: int = 0  # linear warmup, in optimizer steps, before any scheduler
    min_lr_ratio: float = 0.0  # floor of cosine/linear/wsd decay as a fraction of lr
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying
    plateau_monitor: str = "val/loss"  # plateau: validation metric watched
    plateau_patience: int = 10  # plateau: validations without improvement before a cut
    plateau_factor: float = 0.1  # plateau: lr multiplier on a cut
    precision: str = "auto"  # auto (bf16 if fast, else fp32) | fp32 | bf16 | fp16 | fp8
    val_interval: int = field(
        default=0, metadata=on_resume("expected")
    )  # validate every N optimizer steps (0 = at epoch end only)
    val_max_batches: int = 0  # cap on validation global batches, all ranks together (0 = the whole split)
    log_interval: int = field(default=10, metadata=on_resume("expected"))  # optimizer steps between metric logs
    callbacks: List[str] = field(
        default_factory=lambda: ["MetricsLogger", "TensorBoardLogger", "LRSchedulerCallback"],
        metadata=on_resume("expected"),
    )  # extra observers by name or package.module:Class (+NAME appends); schedule, checkpoints, logging always run
    early_stopping_monitor: str = "val/loss"  # EarlyStopping: metric watched
    early_stopping_mode: str = "min"  # EarlyStopping: min | max
    early_stopping_patience: int = 3  # EarlyStopping: validations without improvement before stopping
    early_stopping_min_delta: float = 0.0  # EarlyStopping: smallest change counted as improvement
    compile: bool = False  # torch.compile the model
    activation_checkpointing: str = field(
        default="none", metadata={"bool_values": ("none", "full")}
    )  # none | full | selective (recompute all but matmuls)
    nan_policy: str = "raise"  # on a non-finite loss or grad norm: raise | skip the update
    max_skipped_steps: int = 10  # skip policy: stop after this many consecutive skipped steps
    # Loss-spike recovery (llm/training/optim/spike.py; docs/checkpointing.md, "Loss spikes and rollback"). Their
    # resume policy is the default, warn: a change on resume changes the run's path, and is reported.
    spike_policy: str = "off"  # on a non-finite loss or a loss spike: off | rollback (to the last checkpoint)
    spike_window: int = 50  # rollback: a step's loss is judged against the losses of the last N steps
    spike_zscore: float = 6.0  # rollback: a loss this many standard deviations above the window's mean is a spike
    spike_min_steps: int = 20  # rollback: losses in the window before spikes are judged (non-finite ones always are)
    spike_skip_steps: int = 1  # rollback: optimizer steps of data skipped after a rollback, ending with the spike's
    spike_lr_scale: float = 1.0  # rollback: the peak lr is multiplied by this at each rollback
    spike_max_rollbacks: int = 3  # rollback: the next spike after this many rollbacks stops the run (with an error)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    eval_only: bool = False  # set up, load (model.init_from, resume), validate once and exit: no training, no saves
    lora_rank: int = 0  # LoRA adapter rank (0 = off); needs peft
    lora_alpha: float = 16.0  # LoRA scale: x lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on LoRA adapter inputs
    # LoRA targets (README, "Adapters"): the projections (default), gate (MoE router), w_gate_up w_down (MoE experts),
    # lm_head (untied)
    lora_targets: List[str] = field(default_factory=lambda: list(LORA_TARGETS))  # + gate w_gate_up w_down (MoE) lm_head
    lora_variant: str = "lora"  # lora | dora | rslora (peft's variants)
    lora_quantize: str = "none"  # none | nf4 (QLoRA: 4-bit base, CUDA + bitsandbytes)
    # Preference tuning: the dpo task (llm/training/tasks/dpo_task.py, preference_losses.py); it checks these.
    # (`--help` lists them under `--task dpo` only.)
    preference_loss: str = field(default="dpo", metadata=for_tasks("dpo"))  # dpo | ipo | simpo | orpo | pkg.mod:Loss
    dpo_beta: float = field(default=0.1, metadata=for_tasks("dpo"))  # the loss's beta (ipo: tau, orpo: lambda)
    dpo_label_smoothing: float = field(default=0.0, metadata=for_tasks("dpo"))  # dpo, simpo: share of flipped labels
    simpo_gamma: float = field(default=0.5, metadata=for_tasks("dpo"))  # simpo: target reward margin
    # dpo, ipo: reference log-probs computed once, before training
    dpo_precompute_ref: bool = field(default=False, metadata=for_tasks("dpo"))
    # Profiling (issue 23; llm/training/observers/profiler.py).
    profile_steps: str = field(
        default="", metadata=on_resume("expected")
    )  # A:B: torch.profiler trace of steps A..B in RUN/profile/
    # Recipe levers (issue 24): off, or torch's Muon defaults, unless set (benchmarks/RESULTS.md ranks them).
    decay_shape: str = "linear"  # wsd: decay to min_lr_ratio: linear | sqrt (1-sqrt)
    seq_len_warmup: int = field(default=0, metadata=for_tasks("lm"))  # first N steps: rows of T/8, T/4, T/2 (0 = off)
    muon_momentum: float = 0.95  # muon: momentum of torch.optim.Muon
    muon_nesterov: bool = True  # muon: Nesterov momentum
    muon_ns_steps: int = 5  # muon: Newton-Schulz iterations
    muon_ns_coefficients: List[float] = field(default_factory=lambda: [3.4445, -4.775, 2.0315])  # muon: a b c
    muon_embeddings: bool = False  # muon: embedding tables train with Muon too (else AdamW)
    adamw_lr_scale: float = 1.0  # muon: the AdamW side's lr / lr


@dataclass
class LoggingConfig(Freezable):
    """Where a run writes its records."""

    log_dir: str = ""  # run directory (default: runs/<task>-<timestamp>)
    level: str = "INFO"  # console log level
    loggers: List[str] = field(
        default_factory=lambda: ["console", "jsonl", "tensorboard"]
    )  # metric sinks: console, jsonl, tensorboard, csv, wandb, mlflow (+NAME appends)
    project: str = "llm"  # wandb project / mlflow experiment name


@dataclass
class CheckpointConfig(Freezable):
    """Checkpoints and resume."""

    interval: int = 0  # save every N optimizer steps (0 = only at the end)
    keep_last: int = 3  # checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto (newest complete checkpoint in the run dir) | none | PATH
    monitor: str = ""  # also keep the best checkpoint by this validation metric (e.g. val/loss)
    mode: str = "min"  # best checkpoint: min | max
    overwrite: bool = False  # let resume=none or a branch from an older checkpoint save over later checkpoints
    # Asynchronous saves (issue 23; llm/training/async_save.py).
    async_save: bool = field(
        default=False, metadata={"flag_aliases": ("--checkpoint-async",)}
    )  # save in a background thread


@dataclass
class DistributedConfig(Freezable):
    """Multi-process training."""

    nproc_per_node: int = 1  # local worker processes to spawn (torchrun sets its own)
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    strategy: str = "ddp"  # ddp | fsdp | hsdp (fsdp within shard groups, replicated across them)
    expert_parallel: int = 1  # MoE: split each layer's experts over this many ranks (all-to-all dispatch; ddp, fsdp)
    timeout_minutes: float = 10.0  # a collective waiting longer than this fails the job
    master_port: int = 0  # rendezvous port for spawned workers (0 = a free port)
    # Tensor parallelism (docs/scale-out.md): the T consecutive ranks of a group read the same batch
    tensor_parallel: int = 1  # split attention heads and MLP columns over this many ranks
    # HSDP (docs/scale-out.md, "HSDP"): distributed.strategy=hsdp shards within groups of shard_size ranks
    shard_size: int = 0  # hsdp: processes per shard group (0 = those of one node)
    # Sequence and loss parallelism inside each tensor-parallel group (docs/scale-out.md; lm and sft tasks)
    sequence_parallel: bool = field(
        default=False, metadata=for_tasks("lm", "sft")
    )  # with tensor_parallel > 1: norms on sequence shards, a vocabulary-split loss


@dataclass
class Config(Freezable):
    """The whole run: one section per component, plus the task and seed."""

    task: str = field(
        default="regression", metadata=on_resume("refused", "--task")
    )  # task name (see --help for the list) or package.module:Class
    seed: int = 42  # global seed; each rank derives its own
    plugins: List[str] = field(
        default_factory=list, metadata=on_resume("expected")
    )  # modules imported first, to register extensions
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=on_resume("expected"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=on_resume("expected"))
    distributed: DistributedConfig = field(default_factory=DistributedConfig, metadata=on_resume("expected"))

    def __post_init__(self) -> None:
        # Lines for the run's start (e.g. what precision `auto` chose); not part of the saved config.
        self.notes: list[str] = []

    @property
    def logger(self) -> logging.Logger:
        """The framework's logger (the user's guide calls `config.logger.warning(...)`)."""
        return logging.getLogger("llm")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_yaml())


def resume_policy(field_path: str) -> ResumePolicy:
    """What resuming a checkpoint does when `field_path` ("training.lr", "task") of the run's config changed: the
    policy declared beside the field (`on_resume` metadata), see `llm.config.fields.ResumePolicy`."""
    return _resume_policy(Config, field_path)


def resume_tables() -> tuple[tuple[str, ...], dict[str, str], dict[str, str]]:
    """The resume policies of every field of `Config` as the checkpointer reads them (`llm.config.resume_tables`)."""
    return _resume_tables(Config)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "logging": LoggingConfig,
    "checkpoint": CheckpointConfig,
    "distributed": DistributedConfig,
}
TOP_LEVEL = ("task", "seed", "plugins")
# Fields that were switches, with the values their old booleans mean (field metadata "bool_values": (false, true)).
_BOOL_VALUES = {key: {f.name: f.metadata["bool_values"] for f in dataclasses.fields(cls) if "bool_values" in f.metadata}
                for key, cls in SECTIONS.items()}


def apply_dict(config: Config, data: dict[str, Any], source: str) -> None:
    """Apply a nested mapping ({section: {field: value}} plus top-level keys) onto `config`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{shorten(source)}: expected a mapping of sections, got {type(data).__name__}")
    top_types = field_types(Config)
    for key, value in data.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{shorten(source)}: section {key!r} must be a mapping, got {show(value)}")
            section = getattr(config, key)
            types = field_types(SECTIONS[key])
            for name, item in value.items():
                if name not in types:
                    raise ConfigError(
                        f"{shorten(source)}: unknown key {show(f'{key}.{name}')}{did_you_mean(name, types)}; "
                        f"valid keys of '{key}': {', '.join(types)}"
                    )
                legacy = _BOOL_VALUES[key].get(name)  # a field that was a switch takes its old YAML booleans
                if legacy and isinstance(item, bool):
                    item = legacy[item]
                coerced = coerce(f"{key}.{name}", item, types[name])
                setattr(section, name, append_or_replace(f"{key}.{name}", getattr(section, name), coerced))
        elif key in TOP_LEVEL:
            setattr(config, key, append_or_replace(key, getattr(config, key), coerce(key, value, top_types[key])))
        else:
            raise ConfigError(
                f"{shorten(source)}: unknown key {show(key)}{did_you_mean(key, list(SECTIONS) + list(TOP_LEVEL))}; "
                f"valid: {', '.join(list(TOP_LEVEL) + list(SECTIONS))}"
            )



def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from a saved `config.yaml` mapping (e.g. a checkpoint's)."""
    config = Config()
    apply_dict(config, data, "config")
    return config


# ---------------------------------------------------------------------------------------------
# Validation: one place, before any work starts.
# ---------------------------------------------------------------------------------------------


def _check_lora(config: Config) -> None:
    """The LoRA settings that depend on each other or on the machine (the targets are checked on the model)."""
    t, dist = config.training, config.distributed
    require_peft()
    _check(t.lora_variant in LORA_VARIANTS, "training.lora_variant", t.lora_variant,
           f"expected one of {', '.join(LORA_VARIANTS)}")
    _check(t.lora_quantize in LORA_QUANTIZERS, "training.lora_quantize", t.lora_quantize,
           f"expected one of {', '.join(LORA_QUANTIZERS)}")
    experts = [x for x in t.lora_targets if x in LORA_EXPERT_TARGETS]
    _check(not experts or dist.expert_parallel == 1, "distributed.expert_parallel", dist.expert_parallel,
           f"expert adapters ({' '.join(experts)}) are not split across expert-parallel ranks; use 1 or leave them "
           "out of training.lora_targets")
    if t.lora_quantize != "none":
        check_lora_quantize(t.lora_quantize, device=t.device)  # first: on most machines this is the reason
        _check(bool(getattr(config.model, "init_from", "")), "training.lora_quantize", t.lora_quantize,
               "quantizes a pretrained base: name it with model.init_from")
        _check(dist.strategy == "ddp", "training.lora_quantize", t.lora_quantize,
               "4-bit bases are not sharded by fsdp; use distributed.strategy=ddp")


def _check_scale_fields(t: TrainingConfig) -> None:
    """Issue 23's training fields: the recompute mode (its boolean spellings normalized in place), float8's needs,
    the profiled steps."""
    from llm.models.recompute import parse_mode
    from llm.training.observers.profiler import parse_profile_steps
    from llm.training.optim.precision import float8_refusal

    mode = parse_mode(t.activation_checkpointing)
    if mode != t.activation_checkpointing:  # true/false: recorded as the mode they mean
        t.activation_checkpointing = mode
    if t.precision == "fp8":
        why = float8_refusal(t.device)
        if why:
            raise invalid("training.precision", t.precision, why)
    parse_profile_steps(t.profile_steps)


def _check(ok: bool, field: str, value: Any, valid: str, candidates: Any = None) -> None:
    if not ok:
        raise invalid(field, value, valid, candidates)


INT64 = 2**63
MAX_TIMEOUT_MINUTES = 525_600.0  # a year: longer is a typo, and Python's timedelta overflows not far above


def _check_numbers(config: Config) -> None:
    """Every number of every section is finite and fits in 64 bits (torch, numpy and the checkpoint's
    tensors hold them there); the ranges each field needs are checked after this, field by field."""
    owners = [("", config, Config), *((f"{name}.", getattr(config, name), cls) for name, cls in SECTIONS.items())]
    for prefix, owner, cls in owners:
        for f in dataclasses.fields(cls):
            value = getattr(owner, f.name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bool) or not isinstance(item, (int, float)):
                    continue
                if isinstance(item, float) and not math.isfinite(item):
                    raise invalid(f"{prefix}{f.name}", value, "must be a finite number")
                if isinstance(item, int) and not -INT64 <= item < INT64:
                    raise invalid(f"{prefix}{f.name}", value, "must fit in 64 bits")


def validate_config(config: Config, *, check_names: bool = True, check_scheduler: bool = True) -> None:
    """Raise ConfigError on the first invalid value. Registries are consulted for names.

    Numbers must be finite and fit in 64 bits, then lie in each field's range. Notes for the run's start
    (a legal but surprising value) are appended to `config.notes`.
    """
    m, d, t, c, dist = config.model, config.data, config.training, config.checkpoint, config.distributed
    _check_numbers(config)
    # Each rank seeds torch with seed + rank (which takes up to 2**64 - 1); numpy's generators take no negative seed.
    _check(0 <= config.seed < INT64, "seed", config.seed, "an integer in [0, 2**63)")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len", "num_experts", "top_k"):
        _check(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "must be >= 1")
    _check(
        m.hidden_size % m.num_heads == 0, "model.hidden_size", m.hidden_size,
        f"must be divisible by model.num_heads={m.num_heads}",
    )
    if m.hidden_size % m.num_heads == 0:  # rotary embeddings rotate pairs of a head's dimensions
        _check(
            (m.hidden_size // m.num_heads) % 2 == 0, "model.hidden_size", m.hidden_size,
            f"gives an odd head dimension {m.hidden_size // m.num_heads} with model.num_heads={m.num_heads} "
            "(rotary embeddings need an even one)",
        )
    if m.num_kv_heads is not None:
        _check(
            m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads", m.num_kv_heads,
            f"must be >= 1 and divide model.num_heads={m.num_heads}",
        )
    for name in ("intermediate_size", "moe_intermediate_size"):
        value = getattr(m, name)
        _check(value is None or value >= 1, f"model.{name}", value, "must be >= 1 or null")
    multiple = m.intermediate_multiple_of
    _check(multiple >= 1, "model.intermediate_multiple_of", multiple, "must be >= 1")
    if m.init_from:
        _check(os.path.exists(m.init_from), "model.init_from", m.init_from,
               "no such file or directory (an HF Llama/Mixtral folder, a run or a checkpoint directory)")
    if m.preset:
        from llm.models.presets import PRESETS

        _check(m.preset in PRESETS, "model.preset", m.preset, f"one of {', '.join(PRESETS)}", PRESETS)
    _check(m.top_k <= m.num_experts, "model.top_k", m.top_k, f"must be <= model.num_experts={m.num_experts}")
    _check(m.num_shared_experts >= 0, "model.num_shared_experts", m.num_shared_experts, "must be >= 0")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _check(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    _check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
    m.check_rope("model")  # rotary scaling: a known rope_type and usable factors
    m.check_moe("model")  # the MoE fields (coefficients, balance) are the model config's to check

    _check(d.seq_len >= 1, "data.seq_len", d.seq_len, "must be >= 1")
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check(d.num_samples >= 2, "data.num_samples", d.num_samples, "must be >= 2")
    _check(d.vocab_size >= 257, "data.vocab_size", d.vocab_size, "must be >= 257 (the 256 bytes plus merges)")
    _check(d.max_bytes >= 0, "data.max_bytes", d.max_bytes, "must be >= 0 (0 = no cap)")
    _check(d.max_file_bytes >= 0, "data.max_file_bytes", d.max_file_bytes, "must be >= 0 (0 = no cap)")
    _check(d.prepare_workers >= 0, "data.prepare_workers", d.prepare_workers, "must be >= 0 (0 = one per core)")
    _check(d.bpe_sample_bytes >= 0, "data.bpe_sample_bytes", d.bpe_sample_bytes, "must be >= 0 (0 = all)")
    _check(bool(d.text_field), "data.text_field", d.text_field, "must name the field that holds the text")
    if d.path:
        from llm.data.sources import expand_glob  # refuses directory loops, which glob.glob follows for ever

        exists = os.path.exists(d.path) or (glob.has_magic(d.path) and bool(expand_glob(d.path)))
        _check(exists, "data.path", d.path, "no such file, directory or glob match")
    if d.tokenizer not in ("byte", "bpe"):
        _check(
            os.path.isfile(d.tokenizer), "data.tokenizer", d.tokenizer,
            "must be 'byte', 'bpe' or the path of an existing tokenizer.json",
        )

    _check(t.lr > 0, "training.lr", t.lr, "must be > 0")
    _check(t.epochs >= 1, "training.epochs", t.epochs, "must be >= 1")
    _check(t.max_steps >= 0, "training.max_steps", t.max_steps, "must be >= 0 (0 = no limit)")
    _check(t.batch_size >= 1, "training.batch_size", t.batch_size, "must be >= 1")
    _check(t.grad_accum_steps >= 1, "training.grad_accum_steps", t.grad_accum_steps, "must be >= 1")
    _check(t.grad_clip >= 0, "training.grad_clip", t.grad_clip, "must be >= 0 (0 = no clipping)")
    _check(t.weight_decay >= 0, "training.weight_decay", t.weight_decay, "must be >= 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "training.betas", t.betas, "two values in [0, 1)")
    _check(t.warmup >= 0, "training.warmup", t.warmup, "must be >= 0")
    _check(t.lora_rank >= 0, "training.lora_rank", t.lora_rank, "must be >= 0 (0 = LoRA off)")
    if t.lora_rank:
        _check(t.lora_alpha > 0, "training.lora_alpha", t.lora_alpha, "must be > 0")
        _check(0.0 <= t.lora_dropout < 1.0, "training.lora_dropout", t.lora_dropout, "must be in [0, 1)")
        _check(bool(t.lora_targets), "training.lora_targets", t.lora_targets, "name at least one nn.Linear layer")
        _check_lora(config)
    _check(t.step_size >= 1, "training.step_size", t.step_size, "must be >= 1")
    _check(t.gamma > 0, "training.gamma", t.gamma, "must be > 0")
    if t.gamma > 1 and t.scheduler_type in ("step", "exponential"):  # legal (a warm-up by hand), rarely meant
        note = f"training.gamma {t.gamma} > 1: the {t.scheduler_type} scheduler raises the lr over the run"
        if note not in config.notes:
            config.notes.append(note)
    _check(0 <= t.momentum < 1, "training.momentum", t.momentum, "must be in [0, 1)")
    _check(t.muon_lr_scale > 0, "training.muon_lr_scale", t.muon_lr_scale, "must be > 0")
    _check(0 < t.plateau_factor < 1, "training.plateau_factor", t.plateau_factor,
           "must be in (0, 1): the lr is multiplied by it on a plateau")
    _check(t.plateau_patience >= 0, "training.plateau_patience", t.plateau_patience, "must be >= 0")
    _check(t.early_stopping_patience >= 1, "training.early_stopping_patience", t.early_stopping_patience,
           "must be >= 1")
    _check(t.early_stopping_min_delta >= 0, "training.early_stopping_min_delta", t.early_stopping_min_delta,
           "must be >= 0")
    _check(0 <= t.min_lr_ratio <= 1, "training.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _check(0 < t.decay_fraction <= 1, "training.decay_fraction", t.decay_fraction, "must be in (0, 1]")
    _check_levers(t)
    _check(t.precision in PRECISIONS, "training.precision", t.precision, f"one of {', '.join(PRECISIONS)}", PRECISIONS)
    _check_scale_fields(t)
    _check(t.nan_policy in NAN_POLICIES, "training.nan_policy", t.nan_policy, "raise or skip", NAN_POLICIES)
    _check(
        t.scheduler_interval in INTERVALS, "training.scheduler_interval", t.scheduler_interval, "step or epoch",
        INTERVALS,
    )
    for name, mode in (("training.early_stopping_mode", t.early_stopping_mode), ("checkpoint.mode", c.mode)):
        _check(mode in MODES, name, mode, "min or max", MODES)
    _check(t.log_interval >= 1, "training.log_interval", t.log_interval, "must be >= 1")
    _check(t.val_interval >= 0, "training.val_interval", t.val_interval, "must be >= 0")
    _check(t.val_max_batches >= 0, "training.val_max_batches", t.val_max_batches, "must be >= 0")
    _check(t.max_skipped_steps >= 1, "training.max_skipped_steps", t.max_skipped_steps, "must be >= 1")
    _check(t.spike_policy in SPIKE_POLICIES, "training.spike_policy", t.spike_policy, "off or rollback",
           SPIKE_POLICIES)
    _check(t.spike_window >= 2, "training.spike_window", t.spike_window, "must be >= 2 (losses in the window)")
    _check(2 <= t.spike_min_steps <= t.spike_window, "training.spike_min_steps", t.spike_min_steps,
           f"must be >= 2 and <= training.spike_window={t.spike_window}")
    _check(t.spike_zscore > 0, "training.spike_zscore", t.spike_zscore, "must be > 0 (standard deviations)")
    _check(t.spike_skip_steps >= 1, "training.spike_skip_steps", t.spike_skip_steps,
           "must be >= 1 (the spike's own data at least; a replay of it spikes again)")
    _check(0 < t.spike_lr_scale <= 1, "training.spike_lr_scale", t.spike_lr_scale, "must be in (0, 1]")
    _check(t.spike_max_rollbacks >= 1, "training.spike_max_rollbacks", t.spike_max_rollbacks, "must be >= 1")
    if t.spike_policy == "rollback":
        _check(c.interval >= 1, "checkpoint.interval", c.interval,
               "must be >= 1 with training.spike_policy=rollback (it rolls back to the last checkpoint); "
               "set --checkpoint-interval N")
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device) is not None, "training.device", t.device,
        "auto, cpu, cuda or cuda:N",
    )
    if t.device.startswith("cuda"):
        _check(_cuda_available(), "training.device", t.device,
               "no CUDA device is visible to this process (torch.cuda.is_available() is False); use cpu or auto")
        index = int(t.device.partition(":")[2] or 0)
        _check(index < _cuda_device_count(), "training.device", t.device,
               f"this machine has {_cuda_device_count()} visible CUDA device(s), numbered from 0")
    elif t.device == "auto" and _cuda_available():
        pass
    elif t.precision == "fp16":
        raise invalid("training.precision", t.precision, "fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    _check(
        config.logging.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "logging.level", config.logging.level,
        "DEBUG, INFO, WARNING or ERROR",
    )

    _check(c.interval >= 0, "checkpoint.interval", c.interval, "must be >= 0 (0 = only at the end)")
    _check(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    _check(
        not c.monitor or c.monitor.startswith("val/"), "checkpoint.monitor", c.monitor,
        "a validation metric such as val/loss, or empty",
    )
    if c.resume not in ("auto", "none"):
        _check(os.path.exists(c.resume), "checkpoint.resume", c.resume, "auto, none or an existing checkpoint path")

    _check(dist.nproc_per_node >= 1, "distributed.nproc_per_node", dist.nproc_per_node, "must be >= 1")
    _check(dist.backend in BACKENDS, "distributed.backend", dist.backend, "auto, gloo or nccl", BACKENDS)
    _check(dist.strategy in STRATEGIES, "distributed.strategy", dist.strategy, "ddp, fsdp or hsdp", STRATEGIES)
    from llm.training.parallel.mesh import check_hsdp

    check_hsdp(dist.strategy, dist.shard_size, None, dist.tensor_parallel)  # with the world size: check_world_size
    from llm.training.parallel.expert import check_expert_parallel

    check_expert_parallel(dist.expert_parallel, None, m, dist.strategy)
    from llm.training.optim.optimizers import check_strategy

    check_strategy(t.optimizer, dist.strategy)  # muon + fsdp: refused here, before anything is written
    from llm.training.parallel.tensor import check_composition, check_sequence_parallel

    check_composition(dist.tensor_parallel, None, m, t, dist)  # with what T > 1 cannot be combined
    check_sequence_parallel(config.task, dist)  # the tasks whose loss takes vocabulary-split logits
    _check(0 < dist.timeout_minutes <= MAX_TIMEOUT_MINUTES, "distributed.timeout_minutes", dist.timeout_minutes,
           f"must be > 0 and at most {MAX_TIMEOUT_MINUTES:g} (a year)")
    _check(0 <= dist.master_port < 65536, "distributed.master_port", dist.master_port, "a port number (0 = free)")

    repeated = sorted({name for name in t.callbacks if t.callbacks.count(name) > 1})
    if repeated:  # e.g. `+Name` appended to defaults that already hold it; caught before the run dir is written
        raise ConfigError(f"training.callbacks: duplicate callbacks {repeated}")

    if check_names:
        from llm import registry
        from llm.training.core.callbacks import resolve_callback
        from llm.training.observers.sinks import check_logger_names
        from llm.training.optim.optimizers import OPTIMIZERS  # noqa: F401  (registers the built-ins)
        from llm.training.optim.schedulers import SCHEDULERS  # noqa: F401

        for name in t.callbacks:
            resolve_callback(name)
        check_logger_names(config.logging.loggers)
        registry.OPTIMIZERS.get(t.optimizer)
        if check_scheduler and t.scheduler_type != "none":
            registry.SCHEDULERS.get(t.scheduler_type)
        if t.seq_len_warmup and config.task in registry.TASKS.names():  # the lm task's lever (issue 24)
            _check(getattr(registry.TASKS.get(config.task), "splits_windows", False), "training.seq_len_warmup",
                   t.seq_len_warmup, f"0: the task {config.task!r} has no token windows to split")
        if d.module:
            from llm.data import datamodule  # noqa: F401

            registry.DATA_MODULES.get(d.module)


def _check_levers(t: TrainingConfig) -> None:
    """The recipe levers' ranges (issue 24)."""
    from llm.training.optim.schedulers import DECAY_SHAPES

    _check(t.decay_shape in DECAY_SHAPES, "training.decay_shape", t.decay_shape, "linear or sqrt", DECAY_SHAPES)
    _check(t.seq_len_warmup >= 0, "training.seq_len_warmup", t.seq_len_warmup, "must be >= 0 (0 = off)")
    _check(0 <= t.muon_momentum < 1, "training.muon_momentum", t.muon_momentum, "must be in [0, 1)")
    _check(t.muon_ns_steps >= 1, "training.muon_ns_steps", t.muon_ns_steps, "must be >= 1")
    _check(len(t.muon_ns_coefficients) == 3, "training.muon_ns_coefficients", t.muon_ns_coefficients,
           "three values a b c (torch's: 3.4445 -4.775 2.0315)")
    _check(t.adamw_lr_scale > 0, "training.adamw_lr_scale", t.adamw_lr_scale, "must be > 0")


def _same_tokenizer(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.isfile(a) and os.path.isfile(b) and Path(a).read_bytes() == Path(b).read_bytes()
    except OSError:
        return False


def adopt_init_source(
    config: Config, source: Any, yaml_data: dict[str, Any], flags: dict[str, Any]
) -> dict[str, str]:
    """Config resolution for `model.init_from`: the run takes the source's model shape and tokenizer.

    ``source`` is an `llm.models.init_from.InitSource`. A shape field (`SHAPE_FIELDS`) set in the YAML, by a flag
    or by an explicit `model.preset` must equal the source's: a conflict is a ConfigError naming both values.
    `max_seq_len` is the source's unless set (and an unset `data.seq_len` is lowered to it). `data.tokenizer`
    becomes the source's (`byte` or its tokenizer.json); a different one set by the user is a conflict. Returns
    {"section.field": why} for every value taken from the source, so that the task's derived defaults leave them
    alone and the preset note names the reason.
    """
    from llm.models.init_from import ADOPTED_FIELDS, SHAPE_FIELDS
    from llm.models.presets import get_preset

    m, where = config.model, f"model.init_from {config.model.init_from!r}"
    explicit = set(flags) | {f"{section}.{name}" for section, values in yaml_data.items() if isinstance(values, dict)
                             for name in values}
    preset = get_preset(m.preset).fields if m.preset else {}
    mine = m.resolved()  # a derived width left unset (None) compares as the value it stands for
    adopted: dict[str, str] = {}
    for name in ADOPTED_FIELDS:
        theirs, dest = source.model[name], f"model.{name}"
        if name in SHAPE_FIELDS and (dest in explicit or name in preset):
            if getattr(mine, name) != theirs:
                raise ConfigError(f"{dest}: {getattr(mine, name)!r} conflicts with {where}, whose {name} is "
                                  f"{theirs!r}; drop the setting (the run takes the source's shape) or set {theirs!r}")
        elif dest not in explicit:
            setattr(m, name, theirs)
            adopted[dest] = f"from {where}"
    if "data.seq_len" not in explicit and config.data.seq_len > m.max_seq_len:
        config.data.seq_len = m.max_seq_len
        adopted["data.seq_len"] = f"lowered to the context of {where}"
    tokenizer, set_by_user = config.data.tokenizer, "data.tokenizer" in explicit
    if set_by_user and source.tokenizer and not _same_tokenizer(tokenizer, source.tokenizer):
        raise ConfigError(f"data.tokenizer: {tokenizer!r} conflicts with {where}, whose tokenizer is "
                          f"{source.tokenizer!r}; drop --data-tokenizer (the run takes the source's tokenizer)")
    if not set_by_user:
        if not source.tokenizer:
            raise ConfigError(f"data.tokenizer: {where} has no tokenizer.json; pass the model's tokenizer with "
                              "--data-tokenizer PATH/tokenizer.json")
        config.data.tokenizer = source.tokenizer
        adopted["data.tokenizer"] = f"from {where}"
    return adopted


def check_log_dir(path: str) -> None:
    """The run directory can be created (or is a writable directory), checked before anything is written.

    The nearest existing ancestor must be a writable directory: a path under a regular file or in a read-only
    place would otherwise fail only after the workers started.
    """
    if "\0" in path:
        raise invalid("logging.log_dir", path, "not a usable path: it holds a NUL character")
    if any(len(os.fsencode(part)) > 255 for part in Path(path).parts):
        raise invalid("logging.log_dir", path, "not a usable path: a name in it is longer than 255 bytes")
    try:
        target = os.path.abspath(path)
        if os.path.lexists(target) and not os.path.isdir(target):
            raise invalid("logging.log_dir", path, "exists and is not a directory")
        probe = target
        while not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise invalid("logging.log_dir", path, f"cannot be created: {show(probe)} is not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise invalid("logging.log_dir", path, f"cannot be created: {show(probe)} is not writable")
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, ...
        raise invalid("logging.log_dir", path, f"not a usable path: {getattr(exc, 'strerror', None) or exc}") from None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()
