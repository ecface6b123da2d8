"""The ``peftc`` command line, one module per command group: :mod:`~peftc.cli.language` (check, methods),
:mod:`~peftc.cli.compile`, :mod:`~peftc.cli.model` (inspect, graph, explain), :mod:`~peftc.cli.export`,
:mod:`~peftc.cli.train` (train, eval, generate); :mod:`~peftc.cli.app` is the parser and the error net.
The run directory they write and read is :mod:`peftc.rundir`."""
from peftc.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
