"""The help a user reads agrees with what the commands accept: `cloudlab --help` and each
subcommand's, `%cluster?`, and the README's tables of both."""

import argparse
import re

from cloudlab.cli import build_parser
from cloudlab.magics import CLUSTER_HELP, _parser
from cloudlab.plugins import workload_names
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction,
                                                              argparse._SubParsersAction))]


def test_every_command_and_option_of_the_cli_is_explained():
    commands = _subcommands(build_parser())
    assert set(commands) == {"start", "list", "stop", "profiles", "doctor", "gc", "bench", "run"}
    for name, parser in commands.items():
        assert parser.description, f"cloudlab {name} --help has no description"
        for action in _options(parser):
            assert action.help, f"cloudlab {name}: {action.dest} has no help"
    for name, parser in _subcommands(commands["run"]).items():
        assert parser.description, f"cloudlab run {name} --help has no description"
        for action in _options(parser):
            assert action.help, f"cloudlab run {name}: {action.dest} has no help"


def test_the_readme_shows_every_cli_command_and_workload():
    shell = README.split("### From a shell", 1)[1].split("###", 1)[0]
    for name in _subcommands(build_parser()):
        assert f"cloudlab {name}" in shell, f"the README's shell tour lacks cloudlab {name}"
    for name in workload_names():
        assert f"cloudlab run {name}" in shell, f"the README's shell tour lacks run {name}"


def test_cluster_help_and_the_readme_cover_every_magic_command_and_option():
    commands = _subcommands(_parser())
    table = README.split("### In a notebook", 1)[1].split("###", 1)[0]
    for name, parser in commands.items():
        assert f"%cluster {name}" in CLUSTER_HELP, f"%cluster? lacks {name}"
        assert f"`%cluster {name}" in table, f"the README's magic table lacks {name}"
        for action in _options(parser):
            for flag in action.option_strings:
                assert flag in CLUSTER_HELP, f"%cluster? lacks {name} {flag}"
                row = next(line for line in table.splitlines() if f"`%cluster {name}" in line)
                assert flag in row, f"the README's row for %cluster {name} lacks {flag}"
    for magic in ("%push", "%pull", "%%everywhere"):
        assert magic in CLUSTER_HELP and magic in table
    assert re.search(r"--targets", CLUSTER_HELP) and "--targets" in table
