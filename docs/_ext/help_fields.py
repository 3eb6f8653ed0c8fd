"""Griffe extension for the API reference: a dataclass field declared with
`mftx._config.help_field(text, default)` gets `text` as its docstring and `default` as its
value, so the reference shows each config option once, with the help text the CLI and
`ScoreConfig.help()` print and the real default (not the `help_field(...)` call).

Static analysis only (it reads the source's AST): mkdocs.yml lists this file under the
Python handler's `extensions`.
"""

from __future__ import annotations

import ast
from typing import Any, Optional

import griffe


def _help_field_call(node: Any) -> Optional[ast.Call]:
    value = getattr(node, "value", None)
    if not isinstance(node, (ast.AnnAssign, ast.Assign)) or not isinstance(value, ast.Call):
        return None
    func = value.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return value if name == "help_field" else None


class HelpFields(griffe.Extension):
    """Docstring and default of `help_field` dataclass fields."""

    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, **kwargs: Any) -> None:
        call = _help_field_call(node)
        if call is None or not call.args or not isinstance(call.args[0], ast.Constant):
            return
        text = call.args[0].value
        keywords = {k.arg: k.value for k in call.keywords}
        factory = keywords.get("default_factory")
        if isinstance(factory, ast.Lambda):
            default: Optional[ast.expr] = factory.body  # `lambda: [...]`: show the list
        elif factory is not None:
            default = ast.Call(factory, [], [])
        else:
            default = call.args[1] if len(call.args) > 1 else keywords.get("default")
        if default is None:
            default = ast.Constant(None)
        attr.docstring = griffe.Docstring(text, parent=attr)
        attr.value = griffe.safe_get_expression(default, parent=attr.parent)
