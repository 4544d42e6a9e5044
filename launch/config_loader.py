"""Typed config loading: YAML + dotted overrides -> nested dataclasses, checked before any work.

Each section is a dataclass whose fields carry their type, default and a comment. `load()`
rejects, with the key path, the file and the allowed values in the message:
- keys the dataclass does not declare (with the closest valid names),
- values of the wrong type (int / float / str / bool / None / Literal / list / nested section),
- values a section's `validate()` finds impossible.

Overrides are `a.b.c=value` strings; the value is parsed as YAML (`train.steps=20`,
`model.rope_scaling.type=linear`, `data.text_files=[a.txt,b.txt]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config problem a user must fix; the message names the key, the file and the fix."""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, path: str, source: str):
    origin = typing.get_origin(tp)
    where = f"{path} (in {source})"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, path, source)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where} = {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, path, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where} = {value!r} must be {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item_tp is str and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_convert(v, item_tp, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where} must be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _build(cls, data: dict, path: str, source: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown config key {full!r} in {source}{hint} "
                f"(valid keys of {path or 'the top level'}: {', '.join(sorted(fields))})"
            )
        kwargs[key] = _convert(value, hints[key], full, source)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must look like key.path=value (e.g. train.steps=20)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        parsed.append((key.strip(), value))
    return parsed


def load(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build a `cls` instance from a YAML file and dotted overrides, then `validate()` it."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        source = str(p)
    cfg = _build(cls, tree, "", source)
    if overrides:
        data = to_dict(cfg)
        for key, value in parse_overrides(overrides):
            _set_dotted(data, key, value)
        cfg = _build(cls, data, "", f"{source} + command-line overrides")
    try:
        cfg.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{e} (in {source}{' + overrides' if overrides else ''})") from e
    return cfg


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def run_config_command(argv, *, prog: str, description: str, load_config, run) -> int:
    """The body of every config-driven command (`ctxscale train|convert|eval`): parse
    `--config F [--print-config] [key.path=value ...]`, load and validate the config, print it or
    `run(cfg)`. User mistakes (ConfigError / ValueError) exit 2 with the message; the process
    group, if `run` started one, is destroyed on the way out."""
    import argparse
    import logging
    import os
    import sys

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "-c", default=None, help="YAML config")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20")
    args = p.parse_args(argv)
    logging.basicConfig(level=os.environ.get("CTXSCALE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"ctxscale: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    import torch.distributed as dist

    try:
        run(cfg)
    except ValueError as e:  # ConfigError included
        print(f"ctxscale: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
