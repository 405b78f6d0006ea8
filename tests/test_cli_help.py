"""Every command and every argument of ``vmsd`` says what it is for in ``--help``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from vmsd.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _commands(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [c for a in parser._actions if isinstance(a, argparse._SubParsersAction) for c in a._choices_actions]


def test_every_argument_has_help() -> None:
    missing = []
    arguments = 0
    for name, parser in _parsers(build_parser(), "vmsd"):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            arguments += 1
            if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert arguments > 50  # the walk reached every command's arguments
    assert missing == []


def test_every_command_has_help() -> None:
    parser = build_parser()
    commands = _commands(parser)
    assert {c.dest for c in commands} >= {"compile", "check", "inspect", "rewrite", "diff", "incoming", "outgoing"}
    assert [c.dest for c in commands if not c.help] == []


def test_repeatable_options_say_so() -> None:
    """An option that may be given several times (action append) says "repeatable" in its help."""
    for name, parser in _parsers(build_parser(), "vmsd"):
        for action in parser._actions:
            if isinstance(action, argparse._AppendAction):
                assert action.help is not None and "repeatable" in action.help, f"{name} {action.option_strings}"


def test_rewrite_help_shows_set_as_repeatable() -> None:
    """The rendered --help of rewrite, as users see it."""
    text = dict(_parsers(build_parser(), "vmsd"))["vmsd rewrite"].format_help()
    assert "--set SECTION.FIELD=VALUE" in text and "(repeatable;" in text
