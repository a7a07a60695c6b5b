"""A tree of frozen dataclasses read from YAML and dotted `key=value` overrides, by each field's type.

This is the reading half of `nin_dist.config`: it knows nothing of what the keys mean, only how a
YAML document or a command-line string becomes a field of the declared type (`int`, `float`, `bool`,
`str`, `tuple[int, ...]` (a YAML list, or comma-separated text on the command line), optionally
`None`, `bool | str` for a switch with named modes, or a nested dataclass), never with `eval`. An
unknown key names the closest valid one, a wrong type names the expected type; both raise
`ConfigError` (exit code 2). What values are allowed is each dataclass's own `__post_init__` check.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import typing
from pathlib import Path
from typing import Any

import yaml

from nin_dist.errors import ConfigError, first_line

_show = reprlib.Repr()  # values in messages: short and on one line, however large or nested
_show.maxstring, _show.maxother, _show.maxlist, _show.maxdict, _show.maxlevel = 60, 60, 4, 4, 2


def show(value: Any) -> str:
    """`value` as an error message shows it: its repr, shortened to one line."""
    return _show.repr(value)


def require(ok: bool, key: str, allowed: str, value: Any) -> None:
    """Raise ConfigError `key=value is not allowed: allowed` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={show(value)} is not allowed: {allowed}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if set(args) == {bool, str}:
        return "bool or str"
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return f"{_type_name(inner)} or null"
    if typing.get_origin(tp) is tuple:
        return f"a list of {args[0].__name__} (YAML [1, 2, 3], or 1,2,3 on the command line)"
    return tp.__name__


def _convert_tuple(key: str, value: Any, tp) -> tuple:
    """A YAML list, or command-line text `1,2,3` (or `[1,2,3]`), as a tuple of the field's element type.
    Any element that is not one gives one ConfigError line for the whole value; the count is the
    field's own `__post_init__` check (what the key means decides it)."""
    element = typing.get_args(tp)[0]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        items = [item.strip() for item in text.split(",")] if text.strip() else []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{key}={show(value)} has the wrong type: expected {_type_name(tp)}")
    try:
        return tuple(_convert(key, item, element) for item in items)
    except ConfigError:  # the element's own message would name one item as if it were the whole value
        raise ConfigError(f"{key}={show(value)} has the wrong type: expected {_type_name(tp)}") from None


def _convert(key: str, value: Any, tp) -> Any:
    """Convert a YAML value or a command-line string to the field's type, or raise ConfigError."""
    args = typing.get_args(tp)
    optional = type(None) in args
    base = [a for a in args if a is not type(None)][0] if optional else tp
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~"):
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null: expected {_type_name(tp)}")
    if typing.get_origin(base) is tuple:
        return _convert_tuple(key, value, base)
    if set(args) == {bool, str}:  # a switch with named modes: a boolean word stays a boolean, anything else text
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        base = bool if isinstance(value, bool) else str
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
    elif base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:  # not a number: the wrong type (below)
            number = None
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if number is not None:
            require(math.isfinite(number), key, "a finite number", value)
            return number
    elif base is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str):
            return _check_text(key, value)
    raise ConfigError(f"{key}={show(value)} has the wrong type: expected {_type_name(tp)}")


def _check_text(key: str, value: str) -> str:
    """A string field's value, if paths, URIs and names can hold it (no NUL, encodable for the OS)."""
    try:
        ok = "\0" not in value and value.encode("utf-8", "surrogateescape") is not None
    except UnicodeEncodeError:
        ok = False
    require(ok, key, "text without NUL characters or unpaired surrogates", value)
    return value


def _name(text: str) -> str:
    """A key or path as typed when it prints on one line, else its (shortened) repr."""
    return text if text.isprintable() and len(text) <= 100 else show(text)


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {_name(key)}{hint}")


def leaf_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the tree rooted at dataclass `cls`, e.g. 'train.epochs'."""
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _build(cls, values: dict, valid: list[str], prefix: str = ""):
    types_ = _field_types(cls)
    for name in values:
        if not isinstance(name, str):
            where = f" in section {prefix[:-1]}" if prefix else ""
            raise ConfigError(f"config key {show(name)}{where} is not a name ({type(name).__name__}): "
                              f"keys are names such as train or epochs")
        if name not in types_:
            raise _unknown_key(prefix + name, valid)
    kwargs = {}
    for name, tp in types_.items():
        if name not in values:
            continue
        if dataclasses.is_dataclass(tp):
            section = {} if values[name] is None else values[name]  # None: `train:`, every key commented out
            if not isinstance(section, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of keys, not {type(section).__name__} "
                                  f"{show(section)}")
            kwargs[name] = _build(tp, section, valid, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(prefix + name, values[name], tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, raw: str, valid: list[str]) -> None:
    if key not in valid:
        raise _unknown_key(key, valid)
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = raw


def read_yaml(path: str | Path) -> dict:
    """The mapping a `--config` file holds, or ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    where = f"--config {_name(str(path))}"
    if path.is_dir():
        raise ConfigError(f"{where}: is a folder, not a YAML file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL in the path
        raise ConfigError(f"{where}: cannot read it ({getattr(err, 'strerror', None) or first_line(err)})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({first_line(err)})") from None
    except (ValueError, OverflowError, RecursionError) as err:  # e.g. a date 2020-13-01, a 5000-digit int
        raise ConfigError(f"{where}: YAML holds a value that cannot be read ({first_line(err)})") from None
    tree = {} if tree is None else tree  # an empty file, or comments only
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys at the top level, not "
                          f"{type(tree).__name__} {show(tree)}")
    return tree


def load_tree(root, path: str | Path | None, overrides: list[str], skip: tuple[str, ...] = ()):
    """An instance of dataclass `root`: its defaults <- the YAML file <- `key=value` overrides. The
    file's top-level sections named in `skip` are another program's (e.g. nin-sweep's `sweep:`): left out."""
    tree = read_yaml(path) if path is not None else {}
    tree = {key: value for key, value in tree.items() if key not in skip}
    valid = leaf_keys(root)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {show(item)} is not key=value (e.g. train.epochs=2)")
        _set_dotted(tree, key.strip(), raw, valid)
    try:
        return _build(root, tree, valid)
    except TypeError as err:  # a dataclass rejected its arguments: a bug, not user input
        raise RuntimeError(f"config construction failed: {err}") from err
