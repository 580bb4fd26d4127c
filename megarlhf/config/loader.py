"""YAML configs + dotted overrides -> validated dataclasses; field help from docstrings.

Layer: config/. A stage config is a tree of dataclasses. `load_config(Cls, path, ["a.b=3"])`
reads the YAML, applies overrides, converts every leaf to its annotated type and builds
the dataclasses (whose `__post_init__` validates). Unknown keys and unconvertible values
raise `ConfigError` naming the dotted key, what was expected and the closest known keys.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from megarlhf.config.errors import ConfigError

T = TypeVar("T")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} from the string literal written under each dataclass field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` (from YAML or an override string) as type `tp`, or ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{key} = {value!r}: expected one of {list(choices)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} = {value!r}: expected an integer") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} = {value!r}: expected a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return str(value)
    return value


def convert_field(cls: type, name: str, value: Any) -> Any:
    """`value` as dataclass `cls`'s field `name` would hold it (ConfigError if it cannot)."""
    return _convert(value, _hints(cls)[name], name)


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a (nested) mapping, converting every value."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint} (see --help for all fields)")
        kwargs[key] = _convert(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.learning_rate=1e-4)")
        key, raw = item.split("=", 1)
        # YAML parsing gives 3 -> int, 1e-4 -> str (YAML 1.1), [1,2] -> list, true -> bool.
        value = yaml.safe_load(raw) if raw != "" else ""
        out.append((key.strip(), value))
    return out


def load_config(
    cls: type[T], path: str | Path | None, overrides: list[str] = (), prepare: Callable[[dict], None] | None = None
) -> T:
    """Read YAML `path` (optional), apply `key.sub=value` overrides, let `prepare` fill in
    the raw tree (the CLI's: checkpoint.source.apply_model_source), build `cls`."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        tree = loaded
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    if prepare is not None:
        prepare(tree)
    return build(cls, tree)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The fully resolved config as plain data (what run_dir/config.yaml holds)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf field, for --help."""
    rows = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((prefix + f.name, repr(default), docs.get(f.name, "")))
    return rows
