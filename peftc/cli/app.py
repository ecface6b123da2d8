"""The ``peftc`` command line: the parser built from each command group's ``add_commands``, and
:func:`main`, which turns every foreseeable failure into one line naming the file at fault."""
from __future__ import annotations

import argparse
import errno
import json
import sys

from peftc.cli import compile as compile_commands, export, language, model, serve, train
from peftc.errors import PeftcError
from peftc.lang.diagnostics import SpecError, escape

#: the command groups, in the order ``peftc --help`` lists them
GROUPS = (language, compile_commands, model, export, train, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftc", description="The peftc command line: check, inspect, "
                                     "compile, explain, export, train, eval and generate.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def _fail(message: str) -> int:
    """Print ``peftc: error: message`` (control characters escaped, no C++ stack) and return 1."""
    message = message.split("\nException raised from ")[0]          # torch appends the C++ frames
    print("peftc: error: " + "\n".join(escape(line) for line in message.split("\n")), file=sys.stderr)
    return 1


def _os_error(exc: OSError, args) -> str:
    """An OSError as ``file: reason``; one without a file (a full disk on write) names the command's output."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{exc.filename}{f' -> {exc.filename2}' if exc.filename2 else ''}: {reason}"
    output = getattr(args, "out", None) or getattr(args, "onnx", None)
    if output and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {output}: {reason}"
    return reason


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "not enough memory" in text


def main(argv: list[str] | None = None) -> int:
    """Run one command. peftc's own errors are printed without a traceback; so are the failures any input
    can cause that a reader did not turn into one (a safety net: each names what it can), while any other
    exception is a bug in peftc and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except PeftcError as exc:
        return _fail(str(exc))
    except OSError as exc:                      # missing, unreadable or unwritable file, full disk
        return _fail(_os_error(exc, args))
    except UnicodeError as exc:
        return _fail(f"text that is not valid UTF-8 or Unicode: {exc}")
    except json.JSONDecodeError as exc:
        return _fail(f"not valid JSON: {exc}")
    except RecursionError:
        return _fail("input nested too deeply to read (Python's recursion limit)")
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        return _fail(f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    except KeyboardInterrupt:    # `peftc train` has said where its last complete checkpoint is
        print("peftc: interrupted", file=sys.stderr)
        return 130
