"""The ``st-predict`` command line (``st-predict --help``): one module per command, their shared options, the
demo."""

from ._main import build_parser, cli_reference_markdown, main

__all__ = ["build_parser", "cli_reference_markdown", "main"]
