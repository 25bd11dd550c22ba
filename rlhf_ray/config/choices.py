"""Choices a user can pick, as ``Literal`` types: the one place the config keeps allowed values.

A field annotated with a ``Literal`` (or ``Literal[...] | None``) is a choice. Its annotation is
read everywhere the choice matters: the loader converts a YAML or CLI value to the options' type
(``"3"`` -> 3 for ``learner.zero_stage``), validation refuses a value outside the options
(``--key is 'x'; choose one of [...]``, together with every other problem of the config), and
``--help`` lists them. A choice used by one field is written in that field's annotation; the
ones shared by the PPO tree and the SFT/RM trees are named here, once. Choices that mirror a
table of ``rlhf_ray.algorithms`` (estimators, KL estimators, loss aggregation, ratio levels,
rollout correction; the config imports no torch, so it cannot read them) are kept equal to it by
``tests/unit/test_choices.py``.

Standard library only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

Dtype = Literal["float32", "bfloat16"]
TinyModel = Literal["llama", "qwen2"]
Template = Literal["plain", "chat"]
TooLong = Literal["drop", "truncate", "error"]


def is_config_class(tp: Any) -> bool:
    """Whether ``tp`` is a section of a config tree (a dataclass type, not an instance)."""
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def choices_of(tp: Any) -> tuple[Any, ...] | None:
    """The options of a choice annotation, ``None`` first when the field may be unset; None when
    ``tp`` is no choice. E.g. ``Literal["a", "b"] | None`` -> (None, "a", "b")."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and typing.get_origin(inner[0]) is Literal:
            return (None,) * (len(args) - len(inner)) + typing.get_args(inner[0])
    return None


def choice_errors(cfg: Any, prefix: str = "", sections: bool = True) -> list[str]:
    """One line per choice field of the config tree ``cfg`` (dotted key from ``prefix``) whose
    value is not one of its options; ``sections=False`` checks ``cfg``'s own fields only (a root
    whose sections are validated on their own, as the pipeline's stages are)."""
    errors = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, tp, key = getattr(cfg, f.name), hints[f.name], f"{prefix}{f.name}"
        if is_config_class(tp):
            errors += choice_errors(value, key + ".") if sections else []
        elif (allowed := choices_of(tp)) is not None and value not in allowed:
            errors.append(f"--{key} is {value!r}; choose one of {list(allowed)}.")
    return errors
