"""The ``peftc`` command line: :mod:`peftc.cli.commands` (check, methods, inspect, compile, explain, graph,
export and the parser) and :mod:`peftc.cli.train` (train, eval, generate)."""
from peftc.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
