"""The ``peftc`` command line, one module per command group: :mod:`~peftc.cli.language` (check, methods),
:mod:`~peftc.cli.compile`, :mod:`~peftc.cli.model` (inspect, graph, explain), :mod:`~peftc.cli.export`,
:mod:`~peftc.cli.train` (train, eval, generate); :mod:`~peftc.cli.rundir` is the run directory they write
and read, and :mod:`~peftc.cli.app` the parser and the error net."""
from peftc.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
