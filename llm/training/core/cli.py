"""Command-line flags generated from the config dataclasses.

Every field becomes `--<section>-<field>` in kebab case (`--model-use-moe`, `--training-lr`); a
field name that exists in only one section also works bare (`--scheduler-type`). Booleans get
`--x` / `--no-x`, lists take several values (`--training-callbacks A B C`). Parse errors raise
`ConfigError` instead of printing usage, so the CLI reports them as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections import Counter
from typing import Any

from .config import SECTIONS, TOP_LEVEL, Config, field_help, field_types, unwrap_optional
from .errors import ConfigError, did_you_mean

META_FLAGS = ("--config", "--print-config", "--help")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def kebab(name: str) -> str:
    return name.replace("_", "-")


def _scalar_type(base: type, optional: bool, flag: str) -> Any:
    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None

    convert.__name__ = base.__name__
    return convert


def _bare_names() -> set[str]:
    counts = Counter(f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls))
    return {name for name, n in counts.items() if n == 1 and name not in TOP_LEVEL}


def build_parser(task_names: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m llm.training.train",
        description="Train a model. Precedence: defaults < task defaults < --config YAML < flags.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file with config sections (model:, training:, ...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    tasks = f" (one of: {', '.join(task_names)})" if task_names else ""
    defaults = Config()
    helps = field_help(Config)
    parser.add_argument("--task", dest="task", default=argparse.SUPPRESS, help=f"{helps.get('task', '')}{tasks}")
    parser.add_argument(
        "--seed", dest="seed", type=int, default=argparse.SUPPRESS, help=f"{helps['seed']} (default: {defaults.seed})"
    )
    parser.add_argument("--plugins", dest="plugins", nargs="*", default=argparse.SUPPRESS, help=helps["plugins"])
    bare = _bare_names()
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip())
        types, helps, section_defaults = field_types(cls), field_help(cls), getattr(defaults, section)
        for f in dataclasses.fields(cls):
            names = [f"--{section}-{kebab(f.name)}"] + ([f"--{kebab(f.name)}"] if f.name in bare else [])
            default = getattr(section_defaults, f.name)
            text = f"{helps.get(f.name, '')} (default: {default})".replace("%", "%%").strip()
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS, "help": text}
            base, optional = unwrap_optional(types[f.name])
            if base is bool:
                group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            elif typing.get_origin(base) in (list, typing.List):
                inner = typing.get_args(base)[0]
                group.add_argument(*names, nargs="*", type=_scalar_type(inner, False, names[0]), **kwargs)
            else:
                group.add_argument(*names, type=_scalar_type(base, optional, names[0]), metavar=base.__name__.upper(),
                                   **kwargs)
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """Parse `argv` into {"section.field": value}; unknown flags get a did-you-mean."""
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0]
        options = [s for action in parser._actions for s in action.option_strings]
        if flag.startswith("-"):
            raise ConfigError(f"unknown flag {flag.split('=')[0]!r}{did_you_mean(flag.split('=')[0], options)}; "
                              "see --help for every flag")
        raise ConfigError(f"unexpected argument {flag!r}; flags look like --training-lr 0.001")
    return {k: v for k, v in vars(namespace).items() if k not in ("config", "print_config")}


def apply_flags(config: Config, values: dict[str, Any]) -> None:
    for dest, value in values.items():
        if "." in dest:
            section, name = dest.split(".", 1)
            setattr(getattr(config, section), name, value)
        else:
            setattr(config, dest, value)


def pre_parse(argv: list[str]) -> argparse.Namespace:
    """The flags that decide how to parse the rest: --task, --config, --plugins, --help."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task")
    pre.add_argument("--config")
    pre.add_argument("--plugins", nargs="*")
    pre.add_argument("-h", "--help", action="store_true")
    pre.add_argument("--print-config", action="store_true")
    namespace, _ = pre.parse_known_args(argv)
    return namespace
