"""Config dataclass fields that carry their CLI help, so ``python -m offline train --help`` documents every option."""
from __future__ import annotations

from dataclasses import field


def config_option(default, help: str):
    """A config field with its help text (read by ``offline.__main__.add_config_options``)."""
    return field(default=default, metadata={"help": help})
