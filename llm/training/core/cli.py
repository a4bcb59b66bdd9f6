"""Command-line flags generated from the config dataclasses.

Every field becomes `--<section>-<field>` in kebab case (`--model-use-moe`, `--training-lr`). Booleans
get `--x` / `--no-x`; lists take several values (`--training-callbacks A B C` replaces the list, while
`--training-callbacks +EarlyStopping` appends to the value resolved so far, see `append_or_replace`).

Bare aliases (`--lr`) exist only for the names in `BARE_ALIASES`: a short, explicit list of fields whose
bare name is unique across sections and means one obvious thing. A name that is merely unique today is
not enough: `--mode` or `--interval` read as training settings but are checkpoint ones, `--top-k` means
something else to `llm.generate`, and a later field with the same name would silently change what an
alias sets. A bare name that is not on the list gets a did-you-mean naming its full flag.

`--help` shows the defaults the run would use for unset flags (defaults < task defaults < YAML), once per
flag. Parse errors raise `ConfigError` instead of printing usage, so the CLI reports them as one line
with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import typing
from typing import Any

from llm.errors import ConfigError, did_you_mean, show
from llm.training.core.config import SECTIONS, Config, append_or_replace, field_help, field_types, unwrap_optional

# field name -> its section. Unique across sections (a test checks) and obvious without the prefix.
BARE_ALIASES: dict[str, str] = {
    "lr": "training",
    "epochs": "training",
    "max_steps": "training",
    "batch_size": "training",
    "grad_accum_steps": "training",
    "warmup": "training",
    "precision": "training",
    "optimizer": "training",
    "weight_decay": "training",
    "scheduler_type": "training",  # the user's guide runs `--scheduler-type exponential`
    "log_dir": "logging",
}

USAGE = "python -m llm.training.train --task NAME [--config YAML] [--<section>-<field> VALUE ...]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """One line per flag where the terminal allows: `--[no-]x` for booleans, aliases before one metavar.

    argparse's own layout repeats the metavar after every alias and lists `--x, --no-x` in full, which
    pushes most help texts onto a second line.
    """

    def __init__(self, prog: str) -> None:
        width = min(shutil.get_terminal_size().columns, 120) - 2
        super().__init__(prog, max_help_position=min(40, width // 3), width=width)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, argparse.BooleanOptionalAction):
            return ", ".join(f"--[no-]{s[2:]}" for s in action.option_strings if not s.startswith("--no-"))
        if action.option_strings and action.nargs != 0:
            metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
            return f"{', '.join(action.option_strings)} {metavar}"
        return super()._format_action_invocation(action)


def kebab(name: str) -> str:
    return name.replace("_", "-")


def _scalar_type(base: type, optional: bool) -> Any:
    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {show(text)}") from None

    convert.__name__ = base.__name__
    return convert


def _show(value: Any) -> str:
    """A default as the user would type it on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list):
        return " ".join(map(_show, value)) if value else "[]"
    if value == "":
        return "''"
    return str(value)


def _help_text(doc: str, value: Any, dataclass_default: Any) -> str:
    """The field's comment plus its resolved default, printed once.

    A comment may already explain a derived default (`(default: num_heads)` for a field left at None);
    that explanation stands while the value is untouched, and gives way to the value once a task or
    the YAML sets one.
    """
    start = doc.find("(default:")
    if start >= 0:
        if value == dataclass_default:
            return doc
        end = doc.find(")", start)
        doc = (doc[:start] + doc[end + 1:]).strip() if end >= 0 else doc[:start].strip()
    return f"{doc} (default: {_show(value)})".strip()


def build_parser(task_names: list[str] | None = None, defaults: Config | None = None) -> argparse.ArgumentParser:
    """The train CLI's parser; `defaults` is the config resolved so far, whose values `--help` shows."""
    defaults = defaults or Config()
    parser = _Parser(
        prog="python -m llm.training.train",
        usage=USAGE,
        description=(
            "Train a model. Values resolve as defaults < task defaults < --config YAML < flags; the defaults "
            f"shown are those of task {defaults.task!r} and any --config given. A list flag replaces the list; "
            "values that all start with + append to it (--training-callbacks +EarlyStopping)."
        ),
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
        add_help=False,
    )
    helps = field_help(Config)
    run = parser.add_argument_group("run")
    run.add_argument("-h", "--help", action="help", help="show this help and exit")
    run.add_argument("--config", metavar="YAML", help="YAML file with config sections (model:, training:, ...)")
    run.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    tasks = f"one of {', '.join(task_names)} or package.module:Class" if task_names else "task name"
    run.add_argument("--task", dest="task", metavar="NAME", default=argparse.SUPPRESS,
                     help=f"{tasks} (default: {defaults.task})")
    run.add_argument("--seed", dest="seed", type=int, metavar="INT", default=argparse.SUPPRESS,
                     help=f"{helps['seed']} (default: {defaults.seed})")
    run.add_argument("--plugins", dest="plugins", nargs="*", metavar="MODULE", default=argparse.SUPPRESS,
                     help=_help_text(helps["plugins"], defaults.plugins, []))
    hidden: dict[str, int] = {}  # other tasks' own flags, left out of this task's help: {task: count}
    for section, cls in SECTIONS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".") if cls.__doc__ else ""
        group = parser.add_argument_group(f"{section} - {doc}" if doc else section)
        types, docs, plain = field_types(cls), field_help(cls), cls()
        for f in dataclasses.fields(cls):
            names = [f"--{section}-{kebab(f.name)}", *f.metadata.get("flag_aliases", ())]
            if BARE_ALIASES.get(f.name) == section:
                names.append(f"--{kebab(f.name)}")
            value = getattr(getattr(defaults, section), f.name)
            text = _help_text(docs.get(f.name, ""), value, getattr(plain, f.name)).replace("%", "%%")
            owners = f.metadata.get("tasks")
            if owners and defaults.task not in owners:
                text = argparse.SUPPRESS
                for owner in owners:
                    hidden[owner] = hidden.get(owner, 0) + 1
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS, "help": text}
            base, optional = unwrap_optional(types[f.name])
            if base is bool:
                group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            elif "bool_values" in f.metadata:  # a former switch: bare = its true value, --no-X = its false value
                off, on = f.metadata["bool_values"]
                group.add_argument(*names, nargs="?", const=on, metavar=base.__name__.upper(), **kwargs)
                group.add_argument(*(f"--no-{n[2:]}" for n in names), dest=kwargs["dest"], action="store_const",
                                   const=off, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            elif typing.get_origin(base) in (list, typing.List):
                inner = typing.get_args(base)[0]
                group.add_argument(*names, nargs="*", type=_scalar_type(inner, False), metavar=inner.__name__.upper(),
                                   **kwargs)
            else:
                group.add_argument(*names, type=_scalar_type(base, optional), metavar=base.__name__.upper(), **kwargs)
    if hidden:
        counts = ", ".join(f"{task} {n}" for task, n in sorted(hidden.items()))
        parser.epilog = f"Other tasks' own flags ({counts}) are listed by --task NAME --help."
    return parser


# The Hugging Face Trainer's names for what users most often set, and ours: a user coming from `TrainingArguments`
# gets the flag that does the same thing, not the closest spelling (`--save-steps` is nothing like `--max-steps`).
HF_TRAINER_FLAGS = {
    "--save-steps": "--checkpoint-interval",
    "--save-total-limit": "--checkpoint-keep-last",
    "--eval-steps": "--training-val-interval",
    "--logging-steps": "--training-log-interval",
    "--resume-from-checkpoint": "--checkpoint-resume",
    "--learning-rate": "--training-lr",
    "--num-train-epochs": "--training-epochs",
    "--per-device-train-batch-size": "--training-batch-size",
    "--gradient-accumulation-steps": "--training-grad-accum-steps",
    "--warmup-steps": "--training-warmup",
    "--lr-scheduler-type": "--training-scheduler-type",
    "--output-dir": "--logging-log-dir",
    "--max-grad-norm": "--training-grad-clip",
    # A switch there is a value here; the first word is the flag (checked to exist), the rest what to pass.
    "--bf16": "--training-precision bf16",
    "--fp16": "--training-precision fp16",
    "--adam-beta1": "--training-betas B1 B2",
    "--adam-beta2": "--training-betas B1 B2",
    "--warmup-ratio": "--training-warmup N (steps, not a ratio)",
    "--eval-strategy": "--training-val-interval",
    "--evaluation-strategy": "--training-val-interval",
    "--save-strategy": "--checkpoint-interval",
    "--per-device-eval-batch-size": "--training-batch-size",
}


def _unknown_flag_hint(flag: str, options: list[str]) -> str:
    """Point a Hugging Face Trainer name or a bare field name (`--mode`) at our flag(s); otherwise suggest the
    closest flag."""
    hf = HF_TRAINER_FLAGS.get(flag.replace("_", "-"))
    if hf is not None and hf.split()[0] in options:
        return f" (the Hugging Face Trainer's name; here it is {hf!r})"
    negated = flag.startswith("--no-")
    name = (flag[5:] if negated else flag[2:]).replace("-", "_")
    full = [f"--{'no-' if negated else ''}{section}-{kebab(name)}"
            for section, cls in SECTIONS.items() if name in field_types(cls)]
    if full:
        return f" (did you mean {' or '.join(repr(f) for f in full)}?)"
    return did_you_mean(flag, options)


def parse_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """Parse `argv` into {"section.field": value}; unknown flags get a did-you-mean."""
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].split("=")[0]
        options = [s for action in parser._actions for s in action.option_strings]
        if flag.startswith("--"):
            hint = _unknown_flag_hint(flag, options)
            raise ConfigError(f"unknown flag {show(flag)}{hint}; see --help for every flag")
        if flag.startswith("-"):
            raise ConfigError(f"unknown flag {show(flag)}{did_you_mean(flag, options)}; see --help for every flag")
        raise ConfigError(f"unexpected argument {show(flag)}; flags look like --training-lr 0.001")
    return {k: v for k, v in vars(namespace).items() if k not in ("config", "print_config")}


def apply_flags(config: Config, values: dict[str, Any]) -> None:
    """Set parsed flag values on `config`; list values of `+NAME`s append to what it holds already."""
    for dest, value in values.items():
        section, _, name = dest.rpartition(".")
        owner = getattr(config, section) if section else config
        setattr(owner, name, append_or_replace(dest, getattr(owner, name), value))


def pre_parse(argv: list[str]) -> argparse.Namespace:
    """The one pre-parse: the flags that decide how the rest is parsed and resolved, read before the full parser
    exists (it is built from the task's defaults, the preset and the YAML).

    `task`, `config`, `plugins`, `help`, `print_config`; `model_preset` (the preset replaces the task's model
    defaults before the YAML and the other flags apply) and `log_dir` (`--logging-log-dir` / `--log-dir`; whether
    a run's own config.yaml is used as a template). Each is None (False for the switches) when absent. A flag
    without its value is a `ConfigError`, as in the full parser.
    """
    pre = _Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task")
    pre.add_argument("--config")
    pre.add_argument("--plugins", nargs="*")
    pre.add_argument("-h", "--help", action="store_true")
    pre.add_argument("--print-config", action="store_true")
    pre.add_argument("--model-preset")
    pre.add_argument("--logging-log-dir", "--log-dir", dest="log_dir")
    namespace, _ = pre.parse_known_args(argv)
    return namespace
