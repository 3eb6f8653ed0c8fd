"""File names of the report's figures, read by the sections that link them and the code that draws them."""

from __future__ import annotations

import re

__all__ = ["COMBINED_PLOT", "figure_name", "plot_name", "safe_name"]

#: The accuracy plot of every checkpoint side by side.
COMBINED_PLOT = "accuracy-all.png"


def safe_name(name: str) -> str:
    """`name` with anything but letters, digits, ``.``, ``_`` and ``-`` replaced: a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "checkpoint"


def plot_name(checkpoint: str) -> str:
    """File name of a checkpoint's accuracy plot."""
    return f"accuracy-{safe_name(checkpoint)}.png"


def figure_name(key: str, checkpoint: str) -> str:
    """File name of section `key`'s figure of `checkpoint` (``heldout-ckpt-60.png``)."""
    return f"{key}-{safe_name(checkpoint)}.png"
