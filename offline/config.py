"""Config dataclass fields that carry their CLI help and choices, so ``python -m offline train --help``
documents every option and argparse and the dataclasses reject the same bad values from one list."""
from __future__ import annotations

from dataclasses import field, fields
from typing import Any


class ConfigError(ValueError):
    """A bad option value; the CLI prints it once, as argparse does its own errors, and exits 2."""


def config_option(default: Any, help: str, choices: tuple[str, ...] | None = None, many: bool = False,
                  positive: bool = False) -> Any:
    """A config field with its help text and, for an enumerated option, its only valid values.

    ``many``: the value is a comma-separated list of ``choices`` (e.g. the ranker losses to train).
    ``positive``: a whole number >= 1 (argparse refuses 0 before any training).
    Read by ``offline.__main__.add_config_options`` (argparse) and ``check_choices`` (the dataclass).
    """
    metadata: dict[str, Any] = {"help": help, "positive": positive}
    if choices is not None:
        metadata.update(choices=tuple(choices), many=many)
    return field(default=default, metadata=metadata)


def split_names(value: str) -> list[str]:
    """The names of a comma-separated option, blanks dropped: ``"a, b,"`` -> ``["a", "b"]``."""
    return [name.strip() for name in value.split(",") if name.strip()]


def invalid_choice(value: str, choices: tuple[str, ...], many: bool) -> str | None:
    """Why ``value`` is not valid for an option with ``choices`` (None when it is)."""
    names = split_names(value) if many else [value]
    unknown = [n for n in names if n not in choices]
    listed = ", ".join(map(repr, choices))  # argparse's own wording for a single-choice option
    if many and not names:
        return f"no name given (choose from {listed})"
    if unknown:
        return f"invalid choice: {', '.join(map(repr, unknown))} (choose from {listed})"
    return None


def check_choices(config: object, flag_prefix: str) -> None:
    """Raise ``ConfigError`` for any enumerated field of ``config`` whose value is not a choice: a
    config built in code gets the same check as one built by the CLI, before any training starts."""
    for f in fields(config):  # type: ignore[arg-type]
        choices = f.metadata.get("choices")
        problem = choices and invalid_choice(getattr(config, f.name), choices, f.metadata["many"])
        if problem:
            flag = f"--{flag_prefix}{f.name}".replace("_", "-")
            raise ConfigError(f"argument {flag}: {problem}")
