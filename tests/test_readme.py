"""The README's commands and code stay true: every ``quari`` command line in it parses against
the real command line (command, options, argument types), every ``make`` target exists, and
every Python block compiles with imports that resolve. (What each command *does* is tested
where its module is tested; the demo runs the main job end to end.)"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import typer.main

from quari.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text("utf-8")


def _blocks(language: str) -> list[str]:
    # Blocks inside list items are indented: dedent each.
    found = re.findall(rf"^( *)```{language}\n(.*?)^ *```", README, flags=re.S | re.M)
    return [textwrap.dedent(body) for _, body in found]


def _command_lines(program: str) -> list[str]:
    """Shell lines of the README's bash blocks that run ``program``, continuations joined and
    comments removed."""
    lines = []
    for block in _blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(program + " "):
                lines.append(line)
    return lines


QUARI_LINES = _command_lines("quari")


def test_the_readme_shows_every_task():
    for command in ("demo", "embed", "train", "search", "serve", "eval", "index", "set"):
        assert any(line.split()[1] == command for line in [*QUARI_LINES, "quari demo"]), command
    assert "make demo" in README and "make test" in README
    assert "{{" not in README, "a placeholder was left in the README"


@pytest.mark.parametrize("line", QUARI_LINES)
def test_every_quari_command_line_parses(line):
    words = shlex.split(line)[1:]
    command = typer.main.get_command(app)
    path = []
    while hasattr(command, "commands") and words and words[0] in command.commands:
        path.append(words[0])
        command = command.commands[words.pop(0)]
    assert not hasattr(command, "commands"), f"{line!r}: no such command under {path}"
    # Parses options, arguments and their types exactly as a run would, without running it.
    command.make_context(" ".join(["quari", *path]), words)


def test_every_make_target_exists():
    makefile = (ROOT / "Makefile").read_text("utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    for line in _command_lines("make"):
        assert line.split()[1] in targets, line


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_every_python_block_compiles_and_its_imports_resolve(index):
    source = _blocks("python")[index]
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
