"""Write docs/reference/cli.md: every command's flags, generated, never written by hand (`make docs`).

The flags of `cloud_server`, `edge_client train` and `edge_client generate` are generated from settings
dataclasses (`ServerConfig`, `TrainConfig`, `GenerateJob` and `GenerateConfig`, through common/settings.py);
the other `edge_client` commands declare theirs in edge_client/cli.py. Either way this script reads the very
parsers the commands build: it calls each CLI's own `parse_args` with `parse_args` of argparse swapped for one
that hands the parser back, so the page lists what `--help` shows, grouped as `--help` groups it. Each flag
that comes from a dataclass field names that field, and a second part lists every settings dataclass field by
field (type, default, help), the ones with no flag included.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import settings  # noqa: E402

OUT = ROOT / "docs" / "reference" / "cli.md"
HOME = str(Path.home())


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def capture(parse_args, argv: list[str]) -> argparse.ArgumentParser:
    """The top-level parser that `parse_args(argv)` builds, taken at its first `parse_args` call."""
    original = argparse.ArgumentParser.parse_args

    def grab(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = grab  # type: ignore[method-assign]
    try:
        parse_args(argv)
    except _Captured as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"{parse_args.__module__}.parse_args built no parser")


def field_paths(cls, prefix: str) -> dict[str, str]:
    """dest -> 'Class.field' (nested: 'Class.kr.budget') for every CLI field, as settings.add_arguments walks."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False):
            continue
        tp, _ = settings._base(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out.update(field_paths(tp, f"{prefix}.{f.name}"))
        else:
            out[f.name] = f"{prefix}.{f.name}"
    return out


def dataclasses_under(cls, seen: list) -> list:
    """`cls` and every settings dataclass nested in it through a `setting()` field, in field order
    (a plain dataclass field, such as the credentials, is not a setting and is not followed)."""
    if cls in seen:
        return seen
    seen.append(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = settings._base(hints[f.name])
        if dataclasses.is_dataclass(tp) and isinstance(tp, type) and "help" in f.metadata:
            dataclasses_under(tp, seen)
    return seen


def cell(text: object) -> str:
    return str(text).replace(HOME, "~").replace("|", "\\|").replace("\n", " ")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def flags_table(parser: argparse.ArgumentParser, paths: dict[str, str], declared_in: str) -> list[str]:
    """One table per argument group; `declared_in`: where flags that no dataclass field makes are written."""
    formatter = parser._get_formatter()
    lines: list[str] = []
    for grp in parser._action_groups:
        actions = [a for a in grp._group_actions
                   if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if not actions:
            continue
        title = grp.title or "options"
        if title in ("options", "optional arguments"):
            title = "options"
        lines.append(f"**{cell(title)}**" + (f": {cell(grp.description)}" if grp.description else ""))
        lines.append("")
        lines.append("| flag | value | what it does | setting |")
        lines.append("|---|---|---|---|")
        for a in actions:
            names = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.dest}` (positional)"
            if a.nargs == 0:
                value = "switch"
            elif a.choices:
                value = " \\| ".join(f"`{c}`" for c in a.choices)
            else:
                value = f"`{a.metavar or a.dest.upper()}`"
            helptext = formatter._expand_help(a) if a.help else ""
            if a.required:
                helptext += " (required)"
            setting = f"`{paths[a.dest]}`" if a.dest in paths else f"(declared in `{declared_in}`)"
            lines.append(f"| {names} | {value} | {cell(helptext)} | {setting} |")
        lines.append("")
    return lines


def settings_tables(classes: list) -> list[str]:
    lines: list[str] = []
    for cls in classes:
        lines += [f"### `{cls.__module__}.{cls.__name__}`", ""]
        doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        if doc and not doc.startswith(cls.__name__ + "("):
            lines += [cell(doc), ""]
        lines += ["| field | type | default | flag | help |", "|---|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            tp = hints[f.name]
            shown = getattr(tp, "__name__", None) if isinstance(tp, type) else None
            shown = shown or str(tp).replace("typing.", "").replace("pathlib.", "")
            base, _ = settings._base(tp)
            if "help" not in meta:
                flag = "—"
            elif dataclasses.is_dataclass(base):
                flag = "(its fields' flags)" if meta.get("cli", False) else "—"
            elif not meta.get("cli", False):
                flag = "— (Python only)"
            else:
                flag = f"`{meta.get('flag') or '--' + f.name.replace('_', '-')}`"
                if base is bool and settings._default(f):
                    flag = f"`{meta.get('flag') or '--no-' + f.name.replace('_', '-')}`"
                flag += "".join(f", `{a}`" for a in meta.get("aliases", ()))
            default = settings._default(f)
            default = base.__name__ + "()" if dataclasses.is_dataclass(default) else settings._show(default)
            helptext = cell(meta.get("help", ""))
            lines.append(f"| `{f.name}` | `{cell(shown)}` | `{cell(default)}` | {flag} | {helptext} |")
        lines.append("")
    return lines


def main() -> int:
    from cloud_server import cli as cloud_cli
    from cloud_server.cli import ServerConfig
    from edge_client import cli as edge_cli
    from edge_client.generation import CONNECTION, GenerateConfig, GenerateJob
    from edge_client.remote_model import RemoteConfig
    from edge_client.serve import ServeConfig
    from edge_client.trainer import TrainConfig

    cloud = capture(cloud_cli.parse_args, [])
    edge = capture(edge_cli.parse_args, ["train"])
    lines = [
        "# CLI reference",
        "",
        "<!-- Generated by docs/gen_cli.py (`make docs`) from the commands' own parsers and the settings",
        "     dataclasses. Do not edit: change the settings' help text instead. -->",
        "",
        "*Generated by `docs/gen_cli.py` (`make docs`) from the parsers the commands build and the settings "
        "dataclasses they are built from; every flag is as `--help` shows it.*",
        "",
        "The flags of `cloud_server`, `edge_client train`, `generate` and `serve` are generated from "
        "dataclass fields "
        "(`common/settings.py`): each setting, its default, its help and its check are written once, and "
        "Python callers get the same checks. The *setting* column names the field a flag fills. "
        "The other `edge_client` commands declare their flags in `edge_client/cli.py`.",
        "",
        "## `cloud_server`",
        "",
        cell(cloud.description or ""),
        "",
    ]
    lines += flags_table(cloud, field_paths(ServerConfig, "ServerConfig"), "cloud_server/cli.py")
    lines += ["## `edge_client`", "", cell(edge.description or ""), ""]
    lines += flags_table(edge, {}, "edge_client/cli.py")
    for name, sub in subparsers(edge).items():
        lines += [f"### `edge_client {name}`", "", cell(sub.description or ""), ""]
        paths = {"train": field_paths(TrainConfig, "TrainConfig"),
                 "generate": {k: v for k, v in field_paths(RemoteConfig, "RemoteConfig").items() if k in CONNECTION}
                 | field_paths(GenerateJob, "GenerateJob") | field_paths(GenerateConfig, "GenerateConfig"),
                 "serve": {k: v for k, v in field_paths(RemoteConfig, "RemoteConfig").items() if k in CONNECTION}
                 | field_paths(ServeConfig, "ServeConfig"),
                 }.get(name, {})
        lines += flags_table(sub, paths, "edge_client/cli.py")
    lines += ["## Settings dataclasses", "",
              "Every field of the dataclasses the flags above come from, the ones without a flag included "
              "(those are set from Python, e.g. `DLoRAModelForCausalLM.connect(...)`, whose keywords are "
              "`RemoteConfig`'s fields).", ""]
    lines += settings_tables(dataclasses_under(ServerConfig, []) + dataclasses_under(TrainConfig, [])
                             + dataclasses_under(GenerateJob, []) + dataclasses_under(GenerateConfig, [])
                             + dataclasses_under(ServeConfig, []))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines).rstrip() + "\n"
    if not OUT.exists() or OUT.read_text() != text:
        OUT.write_text(text)
        print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
