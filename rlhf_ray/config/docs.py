"""Field documentation for ``--help``: the string literal under each field of a config dataclass,
its default and, for a choice (a ``Literal`` annotation), its options.

Works for any config dataclass defined at module level (the PPO tree in
:mod:`rlhf_ray.config.schema`, the SFT/RM trainers' trees), since the source is found through
the class itself.

Standard library only.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Any

from rlhf_ray.config.choices import choices_of, is_config_class
from rlhf_ray.config.schema import Config


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a config dataclass (its documentation)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def iter_fields(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, str]]:
    """Yield (dotted name, type, default, doc) for every leaf field of the tree."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp, dotted = hints[f.name], f"{prefix}{f.name}"
        if is_config_class(tp):
            yield from iter_fields(tp, dotted + ".")
        else:
            yield dotted, tp, getattr(defaults, f.name), docs.get(f.name, "")


def fields_help(cls: type = Config) -> str:
    """The ``--help`` text of every leaf field of the tree, one field per line: ``--name doc
    (default: value)``, and ``(one of [...])`` for a choice, the options from its annotation."""
    lines = []
    for name, tp, default, doc in iter_fields(cls):
        allowed = choices_of(tp)
        options = f" (one of {list(allowed)})" if allowed is not None else ""
        lines.append(f"  --{name:<38} {doc} (default: {default!r}){options}")
    return "\n".join(lines)
