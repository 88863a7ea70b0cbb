"""Help text survives rich markup: a literal ``[...]`` (``prunecli[eval]``) must be escaped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer
from rich.text import Text

from prunecli.cli import app


def commands(command: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in (getattr(command, "commands", None) or {}).items():
        yield from commands(sub, (*path, name))


def test_no_help_text_is_eaten_by_rich_markup() -> None:
    eaten = []
    for path, command in commands(typer.main.get_command(app), ("prunecli",)):
        texts = [("help", command.help), ("epilog", command.epilog)]
        texts += [(param.name, getattr(param, "help", None)) for param in command.params]
        for where, text in texts:
            if not text:
                continue
            shown = Text.from_markup(text).plain  # what `--help` prints (rich_markup_mode="rich")
            if shown != text.replace("\\[", "["):
                eaten.append(f"{' '.join(path)} {where}: {text!r} is shown as {shown!r}")
    assert not eaten, eaten


def test_eval_help_names_the_extra() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "prunecli[eval]" in result.stdout
