"""mkdocs hook: the command line page's option reference, generated from `mftx.cli`'s
parser, so every subcommand and option appears once, as `mftx <command> --help` prints it.

mkdocs.yml lists this file under `hooks`; a page line `<!-- mftx-cli-reference -->` is
replaced by one section per subcommand (a new subcommand appears without editing the page).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, List

MARKER = "<!-- mftx-cli-reference -->"
WIDTH = "100"  # argparse wraps help at $COLUMNS: fixed, so the page does not depend on the shell


def subcommands() -> List[argparse.ArgumentParser]:
    """The `mftx` subcommand parsers, in the order `mftx --help` lists them."""
    from mftx.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices.values())


def reference() -> str:
    """Markdown: one heading and one `--help` text block per subcommand."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parts = []
        for p in subcommands():
            name = p.prog.split()[-1]
            parts.append(f"### mftx {name}\n\n```text\n{p.format_help().rstrip()}\n```\n")
        return "\n".join(parts)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
