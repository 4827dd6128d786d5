"""The ``st-predict`` command line: ``train``, ``predict``, ``predict-slide``, ``predict-slides``, ``evaluate``,
``benchmark`` and ``demo``, one module each.

Each subcommand is a thin layer over the Python API. Bad input (an :class:`~st_predict.InputError`,
raised where the input is checked) ends with a one-line error on stderr and exit code 2 (argparse's
own convention for usage errors); anything else is a bug or a crash in a dependency, shown with its
traceback and exit code 1. ``--debug`` shows the traceback of bad input too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
import warnings

from st_predict._utils import InputError
from st_predict.cli import _benchmark, _demo, _evaluate, _predict, _train
from st_predict.cli._cohort import add_predict_slides_parser
from st_predict.cli._common import EXIT_BAD_INPUT, EXIT_ERROR
from st_predict.cli._options import HelpFormatter


# -- parser ------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line and a pointer to ``--help`` (not the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``st-predict`` argument parser."""
    fmt = HelpFormatter
    parser = _Parser(
        prog="st-predict",
        description="Predict spatially resolved gene expression from H&E slides with NH2ST. "
        "Predictions are log1p(counts / library size x 1e4) unless the training data was already normalised.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, bad input too")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of every error, bad input too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command in (_train, _predict):
        command.add_parsers(sub, fmt, debug)
    add_predict_slides_parser(sub, fmt, debug)
    for command in (_evaluate, _benchmark, _demo):
        command.add_parsers(sub, fmt, debug)
    return parser


def cli_reference_markdown(width: int = 100) -> str:
    """The command-line reference as Markdown: every subcommand's ``--help``, taken from the parser
    itself (the docs build writes it to ``docs/cli.md``, so the page cannot drift from the code)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)  # argparse wraps to the terminal width
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = [
            "# Command line\n",
            "`st-predict` runs the jobs of the Python API from a shell. Bad input ends with one `error:` line "
            f"and exit code {EXIT_BAD_INPUT}; anything else is a bug and shows its traceback (exit code {EXIT_ERROR}); "
            "`--debug` shows the traceback of bad input too. No command overwrites an output without `--overwrite`.\n",
            "```text", parser.format_help().rstrip(), "```\n",
        ]
        for name, p in sub.choices.items():
            parts += [f"## st-predict {name}\n", "```text", p.format_help().rstrip(), "```\n"]
        return "\n".join(parts)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _version() -> str:
    from st_predict import __version__

    return __version__


def _in_option_words(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """An error written for Python callers ("pass mpp= (e.g. mpp=0.25)") in the command's own words
    ("pass --mpp (e.g. --mpp 0.25)"), for each keyword that is an option of ``command``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices.get(command)
    for action in (sub._actions if sub is not None else []):
        if not action.option_strings or not action.dest.isidentifier():
            continue
        option = max(action.option_strings, key=len)
        key = rf"(?<![\w.-]){re.escape(action.dest)}="
        if isinstance(action, argparse._StoreTrueAction):  # allow_off_tissue=True -> --allow-off-tissue
            message = re.sub(key + r"True\b", option, message)
        message = re.sub(key + r"(?=[\s,;.)]|$)", option, message)
        message = re.sub(key + r"([^\s,;)]+)", rf"{option} \1", message)
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``st-predict`` command; returns the exit code: 0, 2 for bad input (one line on
    stderr), 1 for anything else (with its traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def one_line(message, category, filename, lineno, file=None, line=None):  # a warning is news, not code
        print(f"st-predict {args.command}: {category.__name__}: {message}", file=sys.stderr, flush=True)

    try:
        with warnings.catch_warnings():  # restores warnings.showwarning on the way out
            warnings.showwarning = one_line
            return args.func(args)
    except InputError as err:
        if args.debug:
            traceback.print_exc()
        msg = _in_option_words(str(err), parser, args.command)
        print(f"st-predict {args.command}: error: {msg.splitlines()[0] if msg else type(err).__name__}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception:  # noqa: BLE001 - a bug, or a crash in a dependency: never dressed up as bad input
        traceback.print_exc()
        print(f"st-predict {args.command}: internal error (traceback above); rerun with --debug, and please report "
              "it if the input looks right", file=sys.stderr)
        return EXIT_ERROR
