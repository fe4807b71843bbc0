"""The documentation stays true to the code: generated pages are current, links and commands work.

Fast: nothing here trains or starts a federation. Commands are taken from the fenced code blocks of
README.md and docs/**/*.md: every line of a ``bash`` block, and the ``$ `` lines of a ``console``
block (``text`` blocks hold transcripts, errors shown on purpose included, and are not run). An
``fl-imaging`` line must compose into a valid config; a sibling command (``fl-imaging-data``,
``-predict``, ``-deploy``, ``-bench``, ``-audit``) must parse with its own argparse parser, and
its Hydra overrides (``fl-imaging-bench``, ``check-policy``) must compose too.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from markdown.extensions.toc import slugify

from fl_imaging.cli.main import _overrides_of
from fl_imaging.config import ConfigError
from fl_imaging.config.compose import check_overrides

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

#: Each sibling command and the module whose ``main(argv)`` parses its arguments.
SIBLINGS = {
    "fl-imaging-data": "fl_imaging.cli.data",
    "fl-imaging-predict": "fl_imaging.cli.predict",
    "fl-imaging-deploy": "fl_imaging.cli.deploy",
    "fl-imaging-bench": "fl_imaging.cli.bench",
    "fl-imaging-audit": "fl_imaging.cli.audit",
    "fl-imaging-eval": "fl_imaging.cli.eval",
}

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```\s*$", re.S | re.M)


def _script(name: str) -> ModuleType:
    """Import ``scripts/NAME.py`` (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- generated pages ------------------------------------------------------------------------


def test_config_reference_is_what_the_schema_gives_now() -> None:
    reference = _script("config_reference")
    page = ROOT / reference.OUTPUT
    assert page.read_text() == reference.render(), (
        "docs/reference/config.md is out of date (a config key or comment changed): run "
        "python scripts/config_reference.py"
    )


def test_config_reference_lists_every_key_and_every_choice() -> None:
    text = (ROOT / _script("config_reference").OUTPUT).read_text()
    for key in ("task.dp_sgd.target_epsilon", "strategy.secagg.threshold", "engine.cross_site"):
        assert f"| `{key}` |" in text
    for choice in ("strategy=krum", "tracking=tensorboard", "experiment=hippocampus_iid"):
        assert f"`{choice}`" in text


def test_yaml_comments_read_inline_continued_and_section_comments(tmp_path: Path) -> None:
    conf = tmp_path / "g.yaml"
    conf.write_text(
        "# Header of the file.\n"
        "name: demo                # which one\n"
        "# demo only\n"
        "shape: [32, 32]\n"
        "size: 4                   # first line\n"
        "                          # second line\n"
        "nested:\n"
        "  # Above the key.\n"
        "  key: 1\n"
    )
    header, comments = _script("config_reference").yaml_comments(conf)
    assert header == "Header of the file."
    assert comments == {
        "name": "which one",
        "shape": "[demo only]",
        "size": "[demo only] first line second line",
        "nested": "[demo only]",
        "nested.key": "Above the key.",
    }


def test_results_tables_are_what_their_csv_files_give_now() -> None:
    tables = _script("results_tables")
    used: set[str] = set()
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        used |= set(tables.tables_in(text))
        assert tables.fill_markers(text) == text, (
            f"{page.relative_to(ROOT)}: a results table differs from its CSV: run "
            "python scripts/results_tables.py"
        )
    kept = {p.stem for p in tables.RESULTS.glob("*.csv")}
    assert kept == used, f"CSV files without a table: {sorted(kept - used)}"


def test_every_measured_row_keeps_its_command_commit_and_machine() -> None:
    tables = _script("results_tables")
    for path in sorted(tables.RESULTS.glob("*.csv")):
        _, rows = tables.read_rows(path.stem)
        assert rows, path.name
        for row in rows:
            for column in ("command", "commit", "machine"):
                assert row.get(column, "").strip(), f"{path.name}: a row without its {column}"
            assert re.fullmatch(r"[0-9a-f]{7,40}", row["commit"]), f"{path.name}: {row['commit']}"


def test_results_table_merges_std_and_ratio_columns(tmp_path: Path, monkeypatch) -> None:
    tables = _script("results_tables")
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    (tmp_path / "t.csv").write_text(
        "method,Dice,Dice std,attack,attack ratio,command,commit,machine,notes\n"
        "a,0.5,0.1,0.4,0.8,run a,abc1234,box,-\n"
        "b,0.6,-,-,-,run b,abc1234,box,two\n"
    )
    assert tables.render_table("t") == (
        "| method | Dice | attack | run |\n|---|---|---|---|\n"
        "| a | 0.5 ± 0.1 | 0.4 (0.8) | 1 |\n| b | 0.6 | - | 2 |\n\n"
        "1. `run a` at commit `abc1234`; box.\n2. `run b` at commit `abc1234`; box; two.\n"
    )


def test_commands_reference_is_what_the_parsers_print_now() -> None:
    reference = _script("cli_reference")
    text = reference.PAGE.read_text()
    assert reference.fill_markers(text) == text, (
        "docs/reference/cli.md is out of date (a command's options changed): run "
        "python scripts/cli_reference.py"
    )


# --- the README -----------------------------------------------------------------------------


def test_readme_is_short() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size < 20_000, f"README.md is {size} bytes: move the detail into docs/"


def _anchors(page: Path) -> set[str]:
    """The heading ids MkDocs gives a page (its toc extension's slugify)."""
    text = _FENCE.sub("", page.read_text())
    return {slugify(m.group(1).strip(), "-") for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_every_docs_link_of_the_readme_points_at_a_page() -> None:
    links = re.findall(r"\]\((docs/[^)\s]+)\)", (ROOT / "README.md").read_text())
    assert len(links) >= 10
    for link in links:
        path, _, anchor = link.partition("#")
        page = ROOT / path
        assert page.is_file(), f"README.md links to {path}, which does not exist"
        if anchor:
            assert anchor in _anchors(page), f"README.md links to {link}: no such heading"


def test_readme_and_ci_run_the_same_set_up_and_tests() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    setup = next(line for line in ci.splitlines() if line.startswith("python3.11 -m venv"))
    assert setup.replace(" -q", "") in readme
    assert ".venv/bin/python -m pytest -q" in ci and ".venv/bin/python -m pytest -q" in readme
    build = ".venv/bin/mkdocs build --strict"
    lines = ci.splitlines()
    where = {
        key: next(i for i, line in enumerate(lines) if line.startswith(key))
        for key in (".venv/bin/ruff check", build, ".venv/bin/python -m pytest")
    }
    assert where[".venv/bin/ruff check"] < where[build] < where[".venv/bin/python -m pytest"]


# --- commands in the docs -------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command line of a docs page: where it is, and its words after the program name."""

    page: str
    line: int
    program: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {shlex.join([self.program, *self.args])}"


def _command_lines(block: str, lang: str) -> list[tuple[int, str]]:
    """(line offset, command text) of a fenced block: continuations joined, console prompts."""
    found: list[tuple[int, str]] = []
    pending, start = "", 0
    for offset, raw in enumerate(block.splitlines()):
        if lang == "console":
            if not raw.startswith("$ "):
                continue
            raw = raw[2:]
        if not pending:
            start = offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        found.append((start, pending + raw))
        pending = ""
    return found


def _commands() -> list[Command]:
    """Every fl-imaging command (and ``python scripts/...`` call) in the README and the docs."""
    commands: list[Command] = []
    for page in PAGES:
        text = page.read_text()
        for fence in _FENCE.finditer(text):
            if fence["lang"] not in ("bash", "console", "sh", "shell"):
                continue
            first = text[: fence.start("body")].count("\n") + 1
            for offset, line in _command_lines(fence["body"], fence["lang"]):
                words = shlex.split(line, comments=True)
                for part in _split_on_operators(words):
                    while part and re.fullmatch(r"[A-Z_]+=\S*", part[0]):
                        part = part[1:]  # environment assignments (PYTHONPATH=scripts)
                    if not part:
                        continue
                    program = part[0].removeprefix(".venv/bin/")
                    if program in ("fl-imaging", *SIBLINGS) or (
                        program.startswith("python")
                        and part[1:2]
                        and part[1].startswith("scripts/")
                    ):
                        name = str(page.relative_to(ROOT))
                        commands.append(Command(name, first + offset, program, tuple(part[1:])))
    return commands


def _split_on_operators(words: list[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for word in words:
        if word in ("&&", "||", ";", "|", "&"):
            parts.append([])
        else:
            parts[-1].append(word)
    return parts


COMMANDS = _commands()
#: Placeholders the docs write where a command takes a number, and a number to parse instead.
NUMBER_PLACEHOLDERS = {"RUN_ID": "1"}


def test_the_docs_hold_the_commands_they_should() -> None:
    programs = {c.program for c in COMMANDS}
    assert {"fl-imaging", *SIBLINGS} <= programs
    assert len(COMMANDS) > 60


class _Parsed(Exception):
    """Raised instead of running a command, once its parser has read the arguments."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


def _parse_only(module_name: str, args: list[str], monkeypatch, capsys) -> argparse.Namespace:
    """Parse ``args`` with the command's own parser, without running it; fails the test with
    argparse's message when they do not parse."""
    for method in ("parse_args", "parse_intermixed_args"):
        real = getattr(argparse.ArgumentParser, method)

        def parse(self, argv=None, namespace=None, _real=real):  # noqa: ANN001, ANN202
            raise _Parsed(_real(self, argv, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, method, parse)
    main = importlib.import_module(module_name).main
    try:
        main(args)
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit:
        pytest.fail(f"does not parse: {capsys.readouterr().err.strip()}")
    pytest.fail("the command ran instead of stopping after its parser")


def _composes(overrides: list[str], command: Command) -> None:
    try:
        check_overrides(overrides)
    except ConfigError as err:
        pytest.fail(f"{command}\ndoes not compose into a valid config: {err}")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.page}:{c.line}")
def test_every_docs_command_is_valid(command: Command, monkeypatch, capsys) -> None:
    if command.program.startswith("python"):
        assert (ROOT / command.args[0]).is_file(), f"{command}: no such script"
        return
    if command.program == "fl-imaging":
        _composes(_overrides_of(list(command.args)), command)
        return
    args = [NUMBER_PLACEHOLDERS.get(arg, arg) for arg in command.args]
    parsed = _parse_only(SIBLINGS[command.program], args, monkeypatch, capsys)
    overrides = getattr(parsed, "overrides", None)
    if overrides:
        _composes(list(overrides), command)


def test_a_wrong_docs_command_would_be_found(monkeypatch, capsys) -> None:
    with pytest.raises(ConfigError, match="task.modle"):
        check_overrides(_overrides_of(["task.modle.channels=[4,8]"]))
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --keyfile"):
        _parse_only(
            "fl_imaging.cli.deploy",
            ["site-key", "--name", "a", "--keyfile", "k"],
            monkeypatch,
            capsys,
        )
    with pytest.raises(pytest.fail.Exception, match="invalid choice"):
        _parse_only("fl_imaging.cli.audit", ["check", "runs/x"], monkeypatch, capsys)


# --- module paths ---------------------------------------------------------------------------

_PATH = re.compile(r"(?<![\w./-])((?:fl_imaging|strategies|tasks|scripts|conf|tests)/[\w./-]*\w)")


def test_every_module_path_the_docs_name_exists() -> None:
    missing = []
    for page in PAGES:
        text = page.read_text()
        for match in _PATH.finditer(text):
            path = match.group(1)
            if any(mark in path for mark in ("NAME", "GROUP")) or text[match.end()] == "*":
                continue  # a placeholder or a pattern: conf/strategy/NAME.yaml, scripts/download_*
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "paths that do not exist (old module paths?):\n" + "\n".join(missing)


_DOCS_PAGE = re.compile(r"docs/[\w/-]+\.md")


def test_every_docs_page_the_code_names_exists() -> None:
    # error messages and docstrings point users at pages of the docs: each must be there
    missing = []
    for folder in ("fl_imaging", "strategies", "tasks", "scripts", "conf"):
        for source in sorted((ROOT / folder).rglob("*")):
            if source.suffix not in (".py", ".yaml") or "__pycache__" in source.parts:
                continue
            for page in _DOCS_PAGE.findall(source.read_text()):
                if not (ROOT / page).is_file():
                    missing.append(f"{source.relative_to(ROOT)}: {page}")
    assert not missing, "pages that do not exist:\n" + "\n".join(missing)
