"""CLI entry point: `python -m llm.training.train --task regression|classification|lm [flags]`.

argv/YAML -> the resolved, frozen `Config` (`parse_config`, the one resolution step) -> task class -> launcher (one
process, N spawned local processes, or torchrun) -> `train_worker(rank, world_size, config, task_class)` ->
`TrainingEngine.run()`. User mistakes are reported as one line on stderr with exit status 2, before anything is
written. After `parse_config` nothing assigns to the config (it is frozen, `llm.config.freeze`): a worker that
needs another value (rank 0's run directory name under torchrun) makes a changed copy.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm.artifacts.lock import RunDirInUse, RunLock, live_holder
from llm.artifacts.rundir import check_run_dir
from llm.artifacts.runs import read_init_source
from llm.config import freeze, is_frozen, replace_values
from llm.errors import ConfigError, UserError, did_you_mean, show
from llm.fs import atomic_write
from llm.models.config import ModelConfig
from llm.models.presets import get_preset
from llm.registry import TASKS, import_plugins
from llm.training.core import callbacks as training_callbacks
from llm.training.core.cli import apply_flags, build_parser, parse_flags, pre_parse
from llm.training.core.config import (
    Config,
    adopt_init_source,
    append_or_replace,
    apply_dict,
    check_log_dir,
    load_yaml,
    validate_config,
)
from llm.training.core.engine import TrainingEngine
from llm.training.observers.sinks import RunLogHandler
from llm.training.optim.precision import resolve_precision
from llm.training.parallel.distributed import (
    barrier,
    broadcast_object,
    check_processes_fit_devices,
    claim_failure_report,
    destroy_process_group,
    init_process_group,
    report_worker_failure,
    resolve_device,
    spawn,
    torchrun_env,
)
from llm.training.parallel.expert import check_expert_parallel
from llm.training.parallel.mesh import check_hsdp
from llm.training.parallel.tensor import check_composition
from llm.training.tasks.base_task import TrainingTask
from llm.training.tasks.classification_task import ClassificationTask
from llm.training.tasks.lm_task import LMTask
from llm.training.tasks.regression_task import RegressionTask
from llm.training.tasks.sft_task import SFTTask

# The task table (the user's guide, recipe 3). Tasks registered with `@register_task` in plugins
# and `package.module:Class` names work too.
AVAILABLE_TASKS: dict[str, type[TrainingTask]] = {
    "regression": RegressionTask,
    "classification": ClassificationTask,
    "lm": LMTask,
    "sft": SFTTask,
}


# The table's tasks are registered too, so a plugin that registers one of their names is refused (or, with
# `override=True`, replaces it) instead of being silently shadowed by the table. This runs before any plugin is
# imported; a name taken already is left alone, so that importing this module again (as `__main__` and as
# `llm.training.train`, say) cannot undo a plugin's override. `lm` registers itself.
for _name, _task in AVAILABLE_TASKS.items():
    if _name not in TASKS.names():
        TASKS.register(_name, _task)


def resolve_task(name: str) -> type[TrainingTask]:
    # The registry first: it holds the table, the plugins and any override. A name added to the table after
    # import (code that edits AVAILABLE_TASKS at run time) is found there.
    if name in AVAILABLE_TASKS and name not in TASKS.names():
        task: Any = AVAILABLE_TASKS[name]
    else:
        try:
            task = TASKS.get(name)
        except ConfigError:
            if ":" in name:  # a module:Class that failed to import: its own message says why
                raise
            known = sorted(set(AVAILABLE_TASKS) | set(TASKS.names()))
            raise ConfigError(
                f"task: unknown task {show(name)}; valid: {', '.join(known)} or 'package.module:Class'"
                f"{did_you_mean(name, known)}"
            ) from None
    if not (isinstance(task, type) and issubclass(task, TrainingTask)):
        raise ConfigError(f"task: {show(name)} is not a TrainingTask subclass")
    return task


def build_engine(
    config: Config,
    task_class: type[TrainingTask] | None = None,
    rank: int = 0,
    world_size: int = 1,
    *,
    task: TrainingTask | None = None,
    data_module: Any = None,
    callbacks: list[Any] | None = None,
) -> TrainingEngine:
    """The one assembly of a run: the task (`config.task` from the registry unless given), its data module, the
    configured callbacks and the engine. The CLI, the tests and the benchmarks all build engines here; pass
    `task`, `data_module` or `callbacks` to replace the configured ones.

    A config resolved by `parse_config` is frozen and used as it is. One built in code (tests, benchmarks) is
    finished here, in place (a `task` given was built with it): the task's resolved values (the lm task's
    vocabulary) and the automatic precision; then it is frozen like any run's."""
    if not is_frozen(config):
        finish_config(config, task_class or resolve_task(config.task))
    if task is None:
        task = (task_class or resolve_task(config.task))(config)
    if data_module is None:
        data_module = task.build_data_module()
    if callbacks is None:
        callbacks = training_callbacks.build_callbacks(config)
    return TrainingEngine(config, task, rank, world_size, data_module=data_module, callbacks=callbacks)


def _apply_values(config: Config, values: dict[str, Any]) -> None:
    """Set {"section.field": value} on `config` (still being resolved)."""
    for dest, value in values.items():
        section, _, name = dest.rpartition(".")
        setattr(getattr(config, section) if section else config, name, value)


def resolve_auto_precision(config: Config) -> None:
    """The last step of resolution: `training.precision: auto` becomes what this machine's device runs fast, with a
    note for the run's start. The device is the one this process trains on (`LOCAL_RANK` under torchrun; spawned
    workers share the launcher's kind of device)."""
    if config.training.precision != "auto":
        return
    device = resolve_device(config.training.device, int(os.environ.get("LOCAL_RANK", 0)))
    precision, why = resolve_precision("auto", device)
    config.training.precision = precision
    config.notes.append(f"precision {precision} ({why})")


def finish_config(config: Config, task_class: type[TrainingTask]) -> Config:
    """The steps of resolution that need no user input, on a config that is not frozen yet: the task's resolved
    values (`TrainingTask.resolved_values`), then the automatic precision; returns `config`, frozen."""
    _apply_values(config, task_class.resolved_values(config))
    resolve_auto_precision(config)
    return freeze(config)


def _apply_derived(config: Config, task_class: type[TrainingTask], explicit: set[str]) -> dict[str, str]:
    """Apply the task's `derived_defaults` ({"section.field": rule(config)}) to the fields the user did not set
    (YAML or flag); returns {"section.field": why} for the values the rules changed (the rule's docstring)."""
    changed: dict[str, str] = {}
    for dest, rule in getattr(task_class, "derived_defaults", {}).items():
        if dest in explicit:
            continue
        section, _, name = dest.rpartition(".")
        owner = getattr(config, section) if section else config
        value = rule(config)
        if value != getattr(owner, name):
            setattr(owner, name, value)
            changed[dest] = (rule.__doc__ or f"derived by {task_class.__name__}").strip().splitlines()[0]
    return changed


def _preset_note(config: Config, before_task: dict[str, Any], why: dict[str, str]) -> str:
    """One line naming each field of the preset whose value the run does not take from it, and why:
    "model.preset tinyllama-1.1b: hidden_size 2048 -> 1024 (flag), vocab_size 32000 -> 256 (...)"."""
    preset = get_preset(config.model.preset)
    changes = []
    for name, value in preset.fields.items():
        now = getattr(config.model, name)
        if now == value:
            continue
        dest = f"model.{name}"
        if dest in why:
            reason = why[dest]
        elif name == "vocab_size" and now != before_task[name]:
            reason = (f"follows data.tokenizer {config.data.tokenizer!r}; {value} is the vocabulary of "
                      f"{preset.tokenizer}'s tokenizer")
        else:
            reason = f"set by task {config.task}"
        changes.append(f"{name} {value} -> {now} ({reason})")
    return f"model.preset {config.model.preset}: {', '.join(changes)}" if changes else ""


def parse_config(argv: list[str] | None = None) -> tuple[Config, type[TrainingTask], bool]:
    """The one resolution of a run's config; returns (config, task class, print_config), the config frozen.

    In order: defaults < task defaults < preset < YAML < flags < init-from < derived < the task's resolved values <
    auto. A model preset (`--model-preset` or the YAML's `model.preset`) replaces the task's model defaults; model
    fields set in the YAML or by flags override it, and one line in `config.notes` (logged at the run's start) names
    each preset value the run does not use and why. `model.init_from` adopts the source's shape and tokenizer. The
    task's `derived_defaults` fill the fields the user did not set (e.g. the lm task raises `model.max_seq_len` to
    `data.seq_len`), and its `resolved_values` the ones it decides whatever was set (the lm task's vocabulary
    follows the tokenizer). Then everything is validated, the run directory named (unless only printing) and
    `training.precision: auto` resolved for this machine. `--help` prints the flags with the values resolved
    before the flags (what the run would use for each unset flag), so the task and the YAML are resolved first.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = pre_parse(argv)
    yaml_data = load_yaml(pre.config) if pre.config else {}
    if not isinstance(yaml_data, dict):
        raise ConfigError(f"config: {pre.config!r} must hold a mapping of sections, got {type(yaml_data).__name__}")
    plugins = append_or_replace("plugins", [], list(yaml_data.get("plugins") or []))
    if pre.plugins is not None:
        plugins = append_or_replace("plugins", plugins, pre.plugins)
    import_plugins(plugins)
    task_name = str(pre.task or yaml_data.get("task") or Config.task)
    task_class = resolve_task(task_name)
    config = Config()
    apply_dict(config, {"task": task_name, **task_class.config_defaults}, f"{task_class.__name__}.config_defaults")
    yaml_model = yaml_data.get("model") if isinstance(yaml_data.get("model"), dict) else {}
    preset = str(yaml_model.get("preset") or "") if pre.model_preset is None else pre.model_preset
    if preset:
        config.model = ModelConfig.from_preset(preset)  # the preset replaces the task's model defaults
    apply_dict(config, yaml_data, pre.config or "config")
    # --help shows what the run would use for each unset flag, derived values included.
    shown = copy.deepcopy(config)
    _apply_derived(shown, task_class, {f"model.{name}" for name in yaml_model})
    parser = build_parser(sorted(TASKS.names()), shown)
    if pre.help:
        parser.print_help()
        raise SystemExit(0)
    flags = parse_flags(parser, argv)
    apply_flags(config, flags)
    config.plugins = plugins
    sources = {**{f"model.{name}": "YAML" for name in yaml_model}, **{dest: "flag" for dest in flags}}
    if config.model.init_from:  # the source's shape and tokenizer, checked against what the YAML and flags set
        sources.update(adopt_init_source(config, read_init_source(config.model.init_from), yaml_data, flags))
    derived = _apply_derived(config, task_class, set(sources))
    before_task = dataclasses.asdict(config.model)
    _apply_values(config, task_class.resolved_values(config))
    task_class.validate_config(config)
    note = _preset_note(config, before_task, {**derived, **sources}) if config.model.preset else ""
    if note:
        config.notes.append(note)  # logged when the run starts (and into train.log)
    # A task that builds its own scheduler may accept names the registry does not know.
    own_scheduler = task_class.build_scheduler is not TrainingTask.build_scheduler
    validate_config(config, check_scheduler=not own_scheduler)
    check_world_size(config)
    if not pre.print_config:
        if _saved_run_config(pre, config):
            config.logging.log_dir = ""  # a new run from that run's settings (docs/checkpointing.md, Resume rules)
        if not config.logging.log_dir:
            config.logging.log_dir = default_run_dir(config.task)
        check_log_dir(config.logging.log_dir)  # before a worker starts or anything is written
        check_run_dir(config.logging.log_dir)  # not in another run's checkpoints, no planted links
    resolve_auto_precision(config)
    return freeze(config), task_class, pre.print_config


def job_world_size(config: Config) -> int:
    """The number of processes the job will run: torchrun's WORLD_SIZE, else `distributed.nproc_per_node`."""
    env = torchrun_env()
    return env[1] if env is not None else config.distributed.nproc_per_node


def check_world_size(config: Config) -> None:
    """What the number of processes decides, refused before any process starts: the expert-parallel degree must
    divide it (the config alone could not tell)."""
    dist = config.distributed
    check_expert_parallel(dist.expert_parallel, job_world_size(config), config.model, dist.strategy)
    check_composition(dist.tensor_parallel, job_world_size(config), config.model, config.training, dist)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if torchrun_env() is not None else dist.nproc_per_node
    check_hsdp(dist.strategy, dist.shard_size, job_world_size(config), dist.tensor_parallel, local)


def setup_logging(rank: int, level: str, run_dir: Path | None = None,
                  earlier: _EarlyLines | None = None) -> _EarlyLines | None:
    """Console logging (rank 0 at `level`, other ranks warnings only) plus `RUN_DIR/train.log`.

    Without `run_dir` (the run is being set up and its directory does not exist yet), rank 0 also keeps the lines
    for train.log and returns them; pass them as `earlier` once the directory exists and train.log starts with
    them."""
    logger = logging.getLogger("llm")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level.upper() if rank == 0 else "WARNING")
    fmt = logging.Formatter("%(asctime)s %(levelname)s " + (f"[rank {rank}] " if rank else "") + "%(message)s",
                            datefmt="%H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    # Lines the progress bar already shows go to train.log only (loggers.FILE_ONLY).
    console.addFilter(lambda record: getattr(record, "console", True))
    logger.addHandler(console)
    if rank != 0:
        return None
    if run_dir is None:
        early = _EarlyLines()
        logger.addHandler(early)
        return early
    file_handler = RunLogHandler(run_dir / "train.log")  # never through a link planted there
    file_handler.setFormatter(fmt)
    for record in earlier.records if earlier is not None else ():
        file_handler.handle(record)
    logger.addHandler(file_handler)
    return None


class _EarlyLines(logging.Handler):
    """Keeps the log records of a run's set-up for its train.log, which is made after set-up (the most recent
    `MAX_RECORDS`: a set-up that logs without end cannot fill the memory)."""

    MAX_RECORDS = 10_000

    def __init__(self) -> None:
        super().__init__()
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=self.MAX_RECORDS)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _TqdmHandler(logging.StreamHandler):
    """Writes through tqdm so log lines do not tear an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def prepare_run_dir(config: Config, write_config: bool = True) -> Path:
    """Create the run directory (and, unless `write_config` is False, write its config.yaml now).

    `train_worker` leaves config.yaml to the engine, which writes it once the resume checks have passed, so that a
    refused resume leaves the run's recorded config as it was.
    """
    run_dir = Path(config.logging.log_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if write_config:
        atomic_write(run_dir / "config.yaml", config.to_yaml())  # the old file or the new, never through a link
    return run_dir


def default_run_dir(task: str) -> str:
    """`runs/<task>-<id>`: under torchrun the rendezvous run id (TORCHELASTIC_RUN_ID), which stays the same across
    restarts of the job so that a restarted worker group finds its checkpoints; else a timestamp."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if not run_id or run_id == "none":  # torchrun's placeholder without --rdzv-id: shared by unrelated jobs
        run_id = time.strftime("%Y%m%d-%H%M%S")  # under torchrun rank 0's name is broadcast (train_worker)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{task}-{run_id}")
    return os.path.join("runs", safe)


def _saved_run_config(pre: Any, config: Config) -> bool:
    """Whether `--config` names a run's own config.yaml (its logging.log_dir is the directory the file is in) and
    `--logging-log-dir` is not given: then the YAML is a template for a new run, not a way to write into that run.
    `pre` is the pre-parse of the command line (`cli.pre_parse`)."""
    if not pre.config or pre.log_dir is not None or not config.logging.log_dir:
        return False
    return Path(config.logging.log_dir).resolve() == Path(pre.config).resolve().parent


def train_worker(rank: int, world_size: int, config: Config, task_class: type[TrainingTask]) -> dict[str, Any]:
    """One training process: join the process group, set the run up, then make its directory and run it.

    Everything that can refuse a run's inputs is built first: the data (read, tokenized, split), the model, its
    LoRA adapters, the parallel layout, the optimizer and the schedule (`TrainingEngine.setup`). Only then is the
    run directory locked, made and logged into, so a refusal there is one line that leaves nothing behind: no run
    directory, no train.log, no lock file. The lines logged meanwhile reach train.log once it exists. A refusal
    after that, before anything but train.log was written (a checkpoint that `checkpoint.resume` names refused for
    a new run), removes the directory again if this run made it (`_remove_unused_run_dir`)."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(config.training.device, local_rank)
    dist_cfg = config.distributed
    init_process_group(rank, world_size, dist_cfg.backend, device, dist_cfg.timeout_minutes)
    lock: RunLock | None = None
    made: Path | None = None  # the outermost folder this run makes for its run directory (None: it existed)
    refused = False
    try:
        # torchrun starts every process on its own; rank 0's run directory name is everyone's.
        log_dir = broadcast_object(config.logging.log_dir)
        if log_dir != config.logging.log_dir:
            config = replace_values(config, {"logging.log_dir": log_dir})
        run_dir = Path(config.logging.log_dir)
        _refuse_on_every_rank(rank, lambda: _check_not_in_use(run_dir))  # before minutes of set-up for nothing
        early = setup_logging(rank, config.logging.level)  # the console now; train.log once the directory exists
        engine = build_engine(config, task_class, rank, world_size)
        engine.setup()  # every refusal of the data, model, adapters and layout: nothing is written before this
        made = _first_missing(run_dir) if rank == 0 else None
        lock = _lock_run_dir(rank, run_dir)  # before anything is written into it
        if rank == 0:
            prepare_run_dir(config, write_config=False)  # the engine writes config.yaml once resume checks pass
        barrier()
        setup_logging(rank, config.logging.level, run_dir, earlier=early)
        if lock is not None and lock.replaced:
            logging.getLogger("llm").warning("%s", lock.replaced)
        return engine.run()
    except Exception as exc:
        refused = isinstance(exc, UserError)
        if world_size > 1:
            claim_failure_report(exc, rank)  # needs the group's store: decide who reports before it goes away
        raise
    finally:
        if lock is not None:
            lock.release()  # after a normal end, a failure, or a SIGTERM stop (the engine returns then)
        if refused and made is not None and lock is not None:
            _remove_unused_run_dir(Path(config.logging.log_dir), made)
        destroy_process_group()


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (`path` itself, or a parent), None if it exists."""
    missing, current = None, path.absolute()
    while not os.path.lexists(current) and current != current.parent:
        missing, current = current, current.parent
    return missing


def _remove_unused_run_dir(run_dir: Path, made: Path) -> None:
    """Remove a run directory this run made, and the folders made for it up to `made`, when it holds nothing but
    the run's own train.log (a refusal that came after the directory was made): a refused run leaves no empty run
    directory behind. Anything else in it is kept."""
    if made not in (run_dir.absolute(), *run_dir.absolute().parents):
        return
    log_file = os.path.abspath(run_dir / "train.log")
    logger = logging.getLogger("llm")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler) and handler.baseFilename == log_file:
            logger.removeHandler(handler)
            handler.close()
    try:
        if set(os.listdir(run_dir)) - {"train.log"}:
            return
        Path(log_file).unlink(missing_ok=True)
        current = run_dir.absolute()
        while True:
            current.rmdir()  # only ever an empty folder
            if current == made:
                return
            current = current.parent
    except OSError:
        return  # not empty after all, or not ours to remove: leave it


def _check_not_in_use(run_dir: Path) -> None:
    """Refuse a run directory that a live run holds (a quick look; `RunLock` decides for good after set-up)."""
    holder = live_holder(run_dir)
    if holder is not None:
        raise RunDirInUse(f"logging.log_dir: {run_dir} is in use by {holder.describe()}; wait for it, or pick "
                          "another --logging-log-dir")


def _refuse_on_every_rank(rank: int, check: Callable[[], Any]) -> Any:
    """Run `check` on rank 0 and raise its `UserError` on every rank, so that the job reports it once and no rank
    waits for a rank 0 that has given up. Returns what `check` returned on rank 0 (None elsewhere)."""
    result, refusal = None, None
    if rank == 0:
        try:
            result = check()
        except UserError as exc:
            refusal = exc
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise refusal
    return result


def _lock_run_dir(rank: int, run_dir: Path) -> RunLock | None:
    """Rank 0 takes the run directory's lock (see llm/artifacts/lock.py); every rank raises its refusal. Returns
    rank 0's lock, None elsewhere."""
    def take() -> RunLock:
        lock = RunLock(run_dir)
        lock.acquire()
        return lock

    return _refuse_on_every_rank(rank, take)


class _WorkerFailed(Exception):
    """A worker of a multi-process job failed and its error has been reported (or left to another rank)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


def _spawned_worker(rank: int, world_size: int, config: Config, task_class: type[TrainingTask]) -> None:
    try:
        import_plugins(config.plugins)  # a spawned process starts fresh: register the plugins' callbacks again
        train_worker(rank, world_size, config, task_class)
    except Exception as exc:
        # Report here, not through mp.spawn's error queue: its parent shows only the first process it sees
        # exit, which may be a rank that merely lost its peer.
        raise SystemExit(report_worker_failure(exc, rank, world_size)) from None
    _exit_cleanly()


class _forwarding_stop_signals:  # noqa: N801  (used as a `with` block, like contextlib's lower-case helpers)
    """While spawned workers run, SIGTERM/SIGINT to this launcher is passed on to them instead of ending it, so
    the job ends when they have saved, with their exit status. A job manager signals the whole process group, so
    the workers then get the signal twice; their checkpointer takes a prompt repeat as the same request."""

    def __enter__(self) -> None:
        import signal

        self.previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @staticmethod
    def _forward(signum: int, frame: Any) -> None:
        import multiprocessing

        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except OSError:
                pass  # it has just ended


class _quiet_spawn_log:  # noqa: N801  (a `with` block, like _forwarding_stop_signals)
    """While spawned workers run, torch's routine line that it terminates the others after one failed is not shown:
    the failed worker has reported its error (one line for a user error), and the launcher's exit status says it.
    Its other warnings (a worker that had to be killed) still are."""

    @staticmethod
    def _routine(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Terminating process")

    def __enter__(self) -> None:
        logging.getLogger("torch.multiprocessing.spawn").addFilter(self._routine)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("torch.multiprocessing.spawn").removeFilter(self._routine)


def _exit_cleanly() -> None:
    """End a finished multi-process worker without running C++ static destructors.

    The run is complete and everything is flushed; letting the interpreter tear down gloo/FSDP background
    threads occasionally aborts the process ("terminate called without an active exception"), which
    the launcher would report as a failed (or, under torchrun, restarted) worker.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(config: Config, task_class: type[TrainingTask]) -> None:
    """Run the job: under torchrun this process is one worker; else spawn N local workers or run inline."""
    env = torchrun_env()
    if env is not None:
        rank, world_size = env
        try:
            check_processes_fit_devices(config.training.device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        except UserError:
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:
                raise  # one report per machine, not one per process
            raise _WorkerFailed(2) from None
        if config.distributed.nproc_per_node > 1 and rank == 0:
            print(f"warning: distributed.nproc_per_node={config.distributed.nproc_per_node} is ignored under "
                  f"torchrun, which started {world_size} worker(s)", file=sys.stderr)
        try:
            train_worker(rank, world_size, config, task_class)
        except Exception as exc:
            if world_size == 1:
                raise
            raise _WorkerFailed(report_worker_failure(exc, rank, world_size)) from None
        if world_size > 1:
            _exit_cleanly()
    elif config.distributed.nproc_per_node > 1:
        check_processes_fit_devices(config.training.device, config.distributed.nproc_per_node)
        with _forwarding_stop_signals(), _quiet_spawn_log():
            spawn(_spawned_worker, config.distributed.nproc_per_node, (config, task_class),
                  config.distributed.master_port)
    else:
        train_worker(0, 1, config, task_class)


def _reports_errors() -> bool:
    """Whether this process prints a user error: under torchrun every worker parses the same config and meets
    the same mistake, so local rank 0 reports it once per machine and the others exit 2 silently."""
    return torchrun_env() is None or os.environ.get("LOCAL_RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    try:
        config, task_class, print_config = parse_config(argv)
        if print_config:
            sys.stdout.write(config.to_yaml())
            return 0
        launch(config, task_class)
    except UserError as exc:
        if _reports_errors():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except _WorkerFailed as exc:  # a torchrun worker; its error was reported once for the job
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a spawned worker's failure: its own error was printed by that worker
        import torch.multiprocessing as mp

        if isinstance(exc, mp.ProcessExitedException):
            if exc.exit_code is not None and exc.exit_code < 0:  # killed: no worker could say why
                print(f"error: worker process {exc.error_index} was killed by signal {exc.signal_name}",
                      file=sys.stderr)
            return exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
