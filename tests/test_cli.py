"""The ``fastlm`` command line: five commands, every flag documented with its default shown."""

import argparse

from fastlm import cli


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_and_flag_has_help():
    parser = cli.build_parser()
    commands = _subparsers(parser)
    assert set(commands) == {"info", "bench", "train", "finetune", "eval"}
    for name in commands:
        assert name in parser.description, f"fastlm --help does not describe {name}"
    for name, sub in commands.items():
        assert isinstance(sub.formatter_class, type) and issubclass(
            sub.formatter_class, argparse.ArgumentDefaultsHelpFormatter
        ), f"fastlm {name} --help does not show defaults"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"fastlm {name} {action.option_strings} has no help text"


def test_running_from_the_repository_root_works_or_says_what_to_do():
    """From the repository root the source folder shadows an installed (non-editable) fastlm: `python -m fastlm info`
    then either works (an editable install) or fails with one line saying what to do, never a bare
    ModuleNotFoundError."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-m", "fastlm", "info"], cwd=root, capture_output=True, text=True, timeout=300
    )
    if run.returncode != 0:
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError: fastlm is being imported from its source tree"), run.stderr[-2000:]
        assert "run from another folder" in last and "make dev" in last
    else:
        assert "backend cuda" in run.stdout
