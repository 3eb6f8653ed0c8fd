"""Dataclass fields that carry their help text: configs document themselves once.

`ScoreConfig.help()`, the CLI's option help and the API reference read the text
from the field's metadata (``metadata["help"]``).
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any

__all__ = ["help_field"]


def help_field(text: str, default: Any = None, *, default_factory: Any = MISSING) -> Any:
    """A dataclass field with help `text` and `default` (None unless given), or a
    `default_factory` (a callable) for mutable defaults."""
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})
