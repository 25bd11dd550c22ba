"""Building a config tree from YAML and ``--section.field value`` overrides, and back to a dict.

Every value is converted to its field's annotated type (a CLI string is read like a YAML
scalar first; a choice, annotated ``Literal``, to its options' type); unknown keys and wrong
types raise ConfigError naming the dotted key. :func:`load_config` then validates the whole
tree, choices included (:mod:`rlhf_ray.config.choices`).

What is saved or printed goes through :func:`redacted` first: a URL in the config (the reward
endpoint's) may carry a password or a token, which must not end up in ``config.json``, a
checkpoint or a terminal log.

Standard library only; yaml is imported when a file or a CLI value is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import urllib.parse
from typing import Any, Callable, Mapping

from rlhf_ray.config.choices import is_config_class
from rlhf_ray.config.schema import Config, ConfigError, FrozenDict, RolloutConfig
from rlhf_ray.config.validate import validate

# Keys that moved, per section: old field name -> (its dotted place inside the section now, why).
# A config that still uses the old key stops with both names instead of "unknown key".
_VLLM_ONLY = ("only the vllm rollout backend reads it, so it lives in rollout.vllm since rollout.backend "
              "picks the engine")
MOVED_KEYS: dict[type, dict[str, tuple[str, str]]] = {
    RolloutConfig: {name: (f"vllm.{name}", _VLLM_ONLY)
                    for name in ("gpu_memory_utilization", "kv_cache_gib", "enforce_eager")},
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is typing.Literal:
        # A choice: read as its options' type (before any YAML parsing, so a str option stays the
        # text given); validation refuses a value outside the options, naming them, together with
        # every other problem of the config.
        kinds = {type(a) for a in args}
        return _convert(value, kinds.pop(), key) if len(kinds) == 1 else value
    if tp is typing.Any:  # free-form (e.g. rollout.env_args): kept as YAML gave it
        return value
    if isinstance(value, str) and tp is not str:
        value = _parse_scalar(value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            items = args[:1] * len(value) if (len(args) == 2 and args[1] is Ellipsis) else args
            if len(items) != len(value):
                raise ConfigError(f"{key}: expected {len(items)} values, got {len(value)}.")
            return tuple(_convert(v, t, key) for v, t in zip(value, items))
    elif origin is dict:
        if isinstance(value, Mapping):
            return FrozenDict({str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()})
    elif is_config_class(tp):
        if isinstance(value, Mapping):
            return _build(tp, value, key)
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}.")


def _parse_scalar(text: str, key: str) -> Any:
    import yaml  # a CLI value is parsed like a YAML scalar: 0.2, true, [1, 2], {a: 1}

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {text!r}: {exc}") from None


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key in MOVED_KEYS.get(cls, {}):
            raise ConfigError(_moved_message(full, prefix, *MOVED_KEYS[cls][key]))
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}.{hint} Valid keys here: {', '.join(names)}.")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def _moved_message(full: str, prefix: str, place: str, why: str) -> str:
    new = f"{prefix}.{place}" if prefix else place
    section, _, leaf = new.rpartition(".")
    nested = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(section.split(".")))
    return (f"config key {full!r} has moved to {new!r}: {why}. Fix: on the command line write --{new} "
            f"instead of --{full}; in a YAML file move the key under {section!r}:\n{nested}"
            f"{'  ' * (section.count('.') + 1)}{leaf}: <value>")


def config_from_dict(data: Mapping[str, Any], cls: type = Config) -> Any:
    """Build a config (``Config`` or another root dataclass, e.g. the SFT/RM trainers') from
    nested dicts as read from YAML; unknown keys and wrong types raise."""
    return _build(cls, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples as lists), for YAML/JSON dumps."""
    out = dataclasses.asdict(cfg)

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v) for v in x]
        return x

    return fix(out)


MASK = "***"
# Query-parameter names that hold secrets contain one of these (case-insensitive); over-matching
# ("author", "monkey") only hides a harmless value in a saved copy.
SECRET_WORDS = ("token", "key", "secret", "password", "passwd", "auth", "signature", "credential")


def _redact_pairs(text: str) -> str:
    """``a=1&token=x`` -> ``a=1&token=***``; names are matched after percent-decoding, everything
    else is kept byte for byte."""
    out = []
    for piece in text.split("&"):
        name, eq, _ = piece.partition("=")
        if eq and any(w in urllib.parse.unquote_plus(name).lower() for w in SECRET_WORDS):
            piece = f"{name}={MASK}"
        out.append(piece)
    return "&".join(out)


def redact_url(text: str) -> str:
    """``text`` with the secrets of a URL masked: the password of its userinfo (a userinfo without
    a password is masked whole: ``https://<token>@host`` is a common way to pass a token) and the
    values of query and fragment parameters whose names look like secrets (:data:`SECRET_WORDS`).
    A string that is no URL with a scheme and a host comes back unchanged."""
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return text
    if not (parts.scheme and parts.netloc):
        return text
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
    query, fragment = _redact_pairs(parts.query), _redact_pairs(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return text
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redacted(tree: Any) -> Any:
    """A copy of a config dict (as from :func:`config_to_dict`) with every string that is a URL
    passed through :func:`redact_url`; use it for everything that is saved or printed. The input
    is not changed. A resumed run never reads these copies back: its config comes from the YAML
    and the command line again."""
    if isinstance(tree, Mapping):
        return {k: redacted(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redacted(v) for v in tree]
    if isinstance(tree, str):
        return redact_url(tree)
    return tree


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {part!r} is a value, not a section.")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Parse ``--a.b value`` and ``--a.b=value`` pairs into {dotted key: raw string}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field value.")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 1
        else:
            raise ConfigError(f"--{key} needs a value.")
        out[key.replace("-", "_")] = value
        i += 1
    return out


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as fh:
            tree = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist; pass an existing YAML (see configs/).") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(tree).__name__}.")
    return tree


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None, cls: type = Config,
                validator: Callable[[Any], Any] | None = None) -> Any:
    """Read a YAML file (optional) and apply dotted overrides; returns a validated config.

    ``cls`` is the root dataclass (default ``Config``, the PPO run); ``validator`` checks it
    (default ``validate`` for ``Config``; other roots pass their own)."""
    tree = _read_yaml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    cfg = config_from_dict(tree, cls)
    (validator or (validate if cls is Config else (lambda c: None)))(cfg)
    return cfg
