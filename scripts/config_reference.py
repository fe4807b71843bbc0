"""Write the config reference page, ``docs/reference/config.md``, from the typed schema and conf/.

    python scripts/config_reference.py            # (re)write docs/reference/config.md
    python scripts/config_reference.py --check    # exit 1 when the page is not what it would write

Every key of :class:`fl_imaging.config.schema.RunConfig` gets a row: its dotted name, its type
(from the dataclass annotations), its default in the shipped config (``conf/`` composed with no
override, as ``fl-imaging`` runs with no argument), and what it means: the ``#:`` comment above
the field in ``schema.py``, the comment beside the key in ``conf/`` (``conf/base/GROUP.yaml`` and
the group's default choice) and, for an enum, its allowed values. Each config group then lists its
choices (``conf/GROUP/*.yaml``) with their header comment and the keys they set. The page is
generated: ``tests/docs/test_docs.py`` fails when it differs from what this script writes now.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fl_imaging.config import config_dir, schema

__all__ = ["OUTPUT", "render", "yaml_comments"]

#: The page this script writes, relative to the repository root.
OUTPUT = Path("docs/reference/config.md")

_KEY_LINE = re.compile(
    r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.]*):(?P<value>.*?)\s*(?:#\s?(?P<comment>.*))?$"
)
_COMMENT_LINE = re.compile(r"^(?P<indent>\s*)#\s?(?P<text>.*)$")
_ALTERNATIVES = re.compile(r"^[\w.]+( \| [\w.]+)+$")
_ENUM_MEMBER = re.compile(r'^\s*(?P<name>\w+)\s*=\s*"[^"]*"\s*(?:#\s?(?P<comment>.*))?$')


# --- comments -------------------------------------------------------------------------------


def yaml_comments(path: Path) -> tuple[str, dict[str, str]]:
    """Read the comments of one YAML file of ``conf/``.

    Takes the file's path; returns its header (the comment block before the first key, without
    Hydra's ``@package`` line) and a map from each dotted key to its comment: the comment on the
    key's own line with its continuation lines, and the comment block right above it. A single
    comment line without a final stop above a key is a section label (``# demo only``): it is
    put, in brackets, before the comment of every key up to the next blank or comment line.
    """
    header: list[str] = []
    comments: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    section, section_indent = "", 0  # a one-line label above a run of keys: "demo only"
    seen_key = False
    last_key: str | None = None
    last_comment_column: int | None = None
    for line in path.read_text().splitlines():
        if not line.strip():
            pending, section, last_comment_column = [], "", None
            continue
        comment = _COMMENT_LINE.match(line)
        if comment:
            text = comment["text"].strip()
            column = len(comment["indent"])
            if (
                last_key is not None
                and last_comment_column is not None
                and column >= last_comment_column - 2
            ):
                comments[last_key].append(text)
            elif not seen_key:
                if not text.startswith("@package"):
                    header.append(text)
            else:
                pending.append(text)
            continue
        if line.lstrip().startswith("- "):
            last_key, last_comment_column = None, None
            continue
        match = _KEY_LINE.match(line)
        if not match:
            continue
        seen_key = True
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [match["key"]])
        stack.append((indent, match["key"]))
        if len(pending) == 1 and not pending[0].endswith((".", ":")):
            section, section_indent, pending = pending[0], indent, []
        elif pending:
            section = ""
        texts = [f"[{section}]"] if section and indent == section_indent else []
        texts += pending
        if match["comment"]:
            texts.append(match["comment"].strip())
            last_comment_column = line.index("#", len(match["indent"]) + len(match["key"]))
        else:
            last_comment_column = None
        comments[dotted] = texts
        last_key, pending = dotted, []
    return " ".join(header), {k: " ".join(v) for k, v in comments.items() if v}


def _field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comment lines right above each field of a schema dataclass, by field name."""
    lines = inspect.getsource(cls).splitlines()
    found: dict[str, str] = {}
    for number, line in enumerate(lines):
        match = re.match(r"^\s+(\w+):", line)
        if not match:
            continue
        above: list[str] = []
        back = number - 1
        while back >= 0 and lines[back].strip().startswith("#:"):
            above.insert(0, lines[back].strip()[2:].strip())
            back -= 1
        if above:
            found[match.group(1)] = " ".join(above)
    return found


def _enum_comments(cls: type[enum.Enum]) -> dict[str, str]:
    """The comment beside each member of a schema enum, by member value."""
    found: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        match = _ENUM_MEMBER.match(line)
        if match and match["comment"]:
            found[cls[match["name"]].value] = match["comment"].strip()
    return found


def _docstring(cls: type) -> str:
    """A class's docstring as one paragraph per blank-line-separated block."""
    text = inspect.getdoc(cls) or ""
    if cls.__doc__ is None or text.startswith(f"{cls.__name__}("):  # dataclass' generated doc
        return ""
    return "\n\n".join(" ".join(block.split()) for block in text.split("\n\n"))


# --- types and defaults -------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """How a field's annotation reads in the table: ``int``, ``list[int]``, ``float | null``."""
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "str (choice)"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(arg) for arg in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return "any" if tp is Any else tp.__name__


def _enum_of(tp: Any) -> type[enum.Enum] | None:
    """The enum class inside an annotation (``DPMode``, ``DataName | None``), or None."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    for arg in typing.get_args(tp):
        found = _enum_of(arg)
        if found:
            return found
    return None


def _shown(value: Any) -> str:
    """A default as YAML writes it: ``null``, ``true``, ``[8, 16, 32]``, ``{}``, a plain string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return str(value)


def shipped_defaults() -> dict[str, Any]:
    """The config ``fl-imaging`` runs with no argument: ``conf/`` composed, interpolations kept
    as written (``${task.name}``, ``${oc.env:...}``), Hydra's own section left out."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        composed = compose("config")
    GlobalHydra.instance().clear()
    plain = OmegaConf.to_container(composed, resolve=False)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    return plain


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _default_choices() -> dict[str, str]:
    """Each group's default choice, from the ``defaults`` list of ``conf/config.yaml``."""
    listed = yaml.safe_load((config_dir() / "config.yaml").read_text())["defaults"]
    choices: dict[str, str] = {}
    for entry in listed:
        if isinstance(entry, dict):
            for group, choice in entry.items():
                if "@" not in group and choice is not None and not group.startswith("optional"):
                    choices[group] = choice
    return choices


# --- the page -------------------------------------------------------------------------------


def _markdown(text: str) -> str:
    """Docstring markup as Markdown: ``x`` and :func:`x` become `x`."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _cell(text: str) -> str:
    return _markdown(text).replace("|", "\\|").replace("\n", " ")


def _rows(cls: type, prefix: str, defaults: dict[str, Any], notes: dict[str, str]) -> list[str]:
    """Table rows of a dataclass's own (non-dataclass) fields, and sections of its nested ones."""
    hints = typing.get_type_hints(cls)
    field_notes = _field_comments(cls)
    rows: list[str] = []
    for item in dataclasses.fields(cls):
        tp = hints[item.name]
        dotted = f"{prefix}.{item.name}" if prefix else item.name
        if dataclasses.is_dataclass(tp):
            continue
        parts = [field_notes.get(item.name, ""), notes.get(dotted, "")]
        kind = _enum_of(tp)
        if kind is not None and _ALTERNATIVES.match(parts[1]):
            parts[1] = ""  # "a | b" beside the key in conf/: the enum's list says it in full
        if kind is not None:
            values = _enum_comments(kind)
            choices = ", ".join(
                f"`{m.value}` ({values[m.value]})" if m.value in values else f"`{m.value}`"
                for m in kind
            )
            parts.append(f"One of: {choices}.")
        text = " ".join(p for p in dict.fromkeys(parts) if p)
        default = _shown(_lookup(defaults, dotted))
        rows.append(
            f"| `{dotted}` | {_cell(_type_name(tp))} | `{_cell(default)}` | {_cell(text)} |"
        )
    return rows


def _section(
    cls: type, dotted: str, level: int, defaults: dict[str, Any], notes: dict[str, str]
) -> list[str]:
    lines = [f"{'#' * level} `{dotted}`", ""]
    about = _docstring(cls)
    if about:
        lines += [_markdown(about), ""]
    rows = _rows(cls, dotted, defaults, notes)
    if rows:
        lines += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            lines += _section(hints[item.name], f"{dotted}.{item.name}", level + 1, defaults, notes)
    return lines


def _flat(tree: Any, prefix: str = "") -> list[str]:
    """``key=value`` for every leaf of a choice file's mapping (lists and empty maps as leaves)."""
    if isinstance(tree, dict) and tree:
        out: list[str] = []
        for key, value in tree.items():
            out += _flat(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [f"{prefix}={_shown(tree)}"]


def _differs(assignment: str, defaults: dict[str, Any]) -> bool:
    """Whether ``key=value`` (as :func:`_flat` writes it) sets another value than the default."""
    key, value = assignment.split("=", 1)
    try:
        return _shown(_lookup(defaults, key)) != value
    except (KeyError, TypeError):
        return True


def _choices(group: str, default: str | None, defaults: dict[str, Any]) -> list[str]:
    """The list of a group's choices: name, header comment, what it builds on, and the keys it
    sets to another value than the shipped default (``defaults``)."""
    folder = config_dir() / group
    if not folder.is_dir():
        return []
    lines = ["Choices (`conf/" + group + "/`):", ""]
    for path in sorted(folder.glob("*.yaml")):
        header, _ = yaml_comments(path)
        body = yaml.safe_load(path.read_text()) or {}
        bases = [
            str(next(iter(e.items()))[1]) if isinstance(e, dict) else str(e)
            for e in body.pop("defaults", [])
            if e != "_self_"
        ]
        prefix = "" if group == "experiment" else f"{group}."
        sets = [s for s in _flat(body) if _differs(f"{prefix}{s}", defaults)] if body else []
        mark = " (default)" if path.stem == default else ""
        text = f"- `{group}={path.stem}`{mark}: {header}".rstrip(": ")
        if bases:
            text += " Builds on: " + ", ".join(f"`{b}`" for b in bases) + "."
        if sets:
            text += " Sets (unlike the default): " + ", ".join(f"`{s}`" for s in sets) + "."
        lines.append(text)
    return [*lines, ""]


def render() -> str:
    """The whole page, as this script writes it to :data:`OUTPUT`."""
    defaults = shipped_defaults()
    chosen = _default_choices()
    hints = typing.get_type_hints(schema.RunConfig)
    lines = [
        "# Config reference",
        "",
        "<!-- Generated by scripts/config_reference.py from fl_imaging/config/schema.py and conf/;",
        "     do not edit by hand: run `python scripts/config_reference.py`. -->",
        "",
        "Every key `fl-imaging` accepts, by config group. *default* is the value in the",
        "shipped config when `fl-imaging` runs with no argument (`task=segmentation`,",
        "`data=demo`, `strategy=fedavg`, `engine=simulation`, `attack=none`, `tracking=none`);",
        "a group choice or an `experiment=` preset changes some of them (listed under each",
        "group). Override any key on the command line (`fl-imaging engine.rounds=5`); a key that",
        "is not listed here stops the run with the allowed keys. Print the resolved config of",
        "any command with `--cfg job`.",
        "",
    ]
    top_notes = yaml_comments(config_dir() / "config.yaml")[1]
    lines += ["## Top-level keys", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += _rows(schema.RunConfig, "", defaults, top_notes)
    lines.append("")
    for item in dataclasses.fields(schema.RunConfig):
        cls = hints[item.name]
        if not dataclasses.is_dataclass(cls):
            continue
        group = item.name
        notes: dict[str, str] = {}
        sources = [config_dir() / "base" / f"{group}.yaml"]
        if group in chosen:
            sources.append(config_dir() / group / f"{chosen[group]}.yaml")
        for source in sources:
            if source.is_file():
                for key, text in yaml_comments(source)[1].items():
                    notes.setdefault(f"{group}.{key}", text)
        lines += _section(cls, group, 2, defaults, notes)
        lines += _choices(group, chosen.get(group), defaults)
    lines += ["## Experiment presets", ""]
    lines += _choices("experiment", None, defaults)[2:]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the page; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    target = root / OUTPUT
    text = render()
    if args.check:
        if not target.is_file() or target.read_text() != text:
            print(
                f"{OUTPUT} is out of date: run python scripts/config_reference.py", file=sys.stderr
            )
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
