"""Settings declared once: a dataclass field with its help text becomes a command-line flag.

    @dataclass
    class Config:
        steps: int = setting(60, "optimizer steps")
        targets: list[str] = setting(list, "linears to adapt, e.g. q_proj,v_proj", flag="--targets")

`add_arguments(parser, Config)` adds `--steps` (help with its default) and
`build(Config, namespace)` makes the dataclass from the parsed flags, so its
`__post_init__` checks run for the CLI as for Python callers; a failed check
is a ValueError that the CLI prints as a usage error. Nested dataclass fields
(a Kill and Revive config inside the training config) are flattened, and
`from_values(Config, steps=5, budget=8)` builds from the same flat names in
Python (a nested part may also be given whole, by its field name).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any


def setting(default: Any, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (),
            choices: list | None = None, metavar: str | None = None, group: str | None = None,
            cli: bool = True) -> Any:
    """A dataclass field with its help text. `default` may be a callable (a default factory).

    A bool that defaults to True gets a `--no-...` flag; one that defaults to False, a plain switch.
    A list[str] is given comma-separated. `aliases` are further flags for the same field (older
    spellings that keep working). `cli=False` keeps the field out of the command line."""
    meta = {"help": help, "flag": flag, "aliases": aliases, "choices": choices, "metavar": metavar, "group": group,
            "cli": cli}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(tp) -> tuple[Any, bool]:
    """(the type without Optional, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] | None = None, groups: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flags for every CLI field of dataclass `cls` (and of its nested dataclasses), in field order;
    `only` keeps just the fields of those names (a command that needs a few of a config's settings).

    A field's `group` ("title" or "title: description") puts its flag in that argument group;
    `groups` (title -> group) shares groups with the caller. Returns it."""
    groups = {} if groups is None else groups
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", False):
            continue
        tp, optional = _base(hints[f.name])
        if dataclasses.is_dataclass(tp):
            add_arguments(parser, tp, skip=skip, only=only, groups=groups)
            continue
        if only is not None and f.name not in only:
            continue
        target = parser if meta.get("group") is None else group(parser, groups, meta["group"])
        default = _default(f)
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if tp is bool:
            if default:
                flag = meta.get("flag") or "--no-" + f.name.replace("_", "-")
                kw.update(action="store_false", default=True)
            else:
                kw.update(action="store_true", default=False)
            target.add_argument(flag, *meta.get("aliases", ()), **kw)
            continue
        origin = typing.get_origin(tp)
        if origin is list:
            kw["type"] = _comma_list
        elif tp in (int, float, str, Path):
            kw["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {tp}")
        kw["default"] = default
        kw["help"] = f"{meta['help']} (default: {_show(default)})".replace("%", "%%")
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("metavar") or not meta.get("choices"):  # choices show as {a,b} by default
            kw["metavar"] = meta.get("metavar") or flag.lstrip("-").upper().replace("-", "_")
        target.add_argument(flag, *meta.get("aliases", ()), **kw)
    return groups


def group(parser: argparse.ArgumentParser, groups: dict[str, Any], name: str):
    """The argument group called `name` ("title: description"), made on first use."""
    title = name.split(": ", 1)[0]
    if title not in groups:
        description = name.split(": ", 1)[1] if ": " in name else None
        groups[title] = parser.add_argument_group(title, description)
    return groups[title]


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build(cls, namespace: argparse.Namespace, **extra: Any):
    """The dataclass `cls` from parsed flags (nested ones too); `extra` fills fields the CLI does not set."""
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in extra:
            values[f.name] = extra[f.name]
            continue
        tp, _ = _base(hints[f.name])
        if dataclasses.is_dataclass(tp) and f.metadata.get("cli", False):
            values[f.name] = build(tp, namespace)
        elif hasattr(namespace, f.name) and f.metadata.get("cli", False):
            values[f.name] = getattr(namespace, f.name)
    return cls(**values)


def from_values(cls, **values: Any):
    """The dataclass `cls` from settings named as its flags are, flat: a nested part's fields by their own
    names (`from_values(TrainConfig, steps=5, server="gpu:50551", budget=8)`), or the part whole by its field
    name (`kr=KRConfig(...)`). Unset fields keep their defaults. An unknown name is a TypeError."""
    left = dict(values)
    out = _from_values(cls, left)
    if left:
        raise TypeError(f"{cls.__name__} has no setting named {', '.join(sorted(left)[:5])}")
    return out


def _names(cls) -> set[str]:
    """Every field name of `cls` and of its nested dataclasses."""
    hints = _hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        out.add(f.name)
        tp, _ = _base(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out |= _names(tp)
    return out


def _from_values(cls, left: dict[str, Any]):
    hints = _hints(cls)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in left:
            kw[f.name] = left.pop(f.name)
            continue
        tp, _ = _base(hints[f.name])
        if dataclasses.is_dataclass(tp) and _names(tp) & left.keys():
            kw[f.name] = _from_values(tp, left)
    return cls(**kw)
