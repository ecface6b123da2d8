"""Source spans, diagnostics and SpecError: every mistake in a spec, rendered like a compiler's.

    samples/bad.peft:2:11: error: unknown option 'aplha' for lora; did you mean 'alpha'?
        lora q, v aplha=16
                  ^^^^^

The compiler reuses this for mistakes only a model reveals (a statement that selects nothing):
``raise SpecError.at(statement.span, "...", spec.source)``."""
from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from peftc.errors import PeftcError

INDENT = "    "


@dataclass(frozen=True)
class Span:
    """Where a node is in the spec: 1-based line and column; ``end_column`` is one past its last
    character (lark's convention)."""
    line: int
    column: int
    end_line: int
    end_column: int
    filename: str | None = None

    def __str__(self) -> str:
        return f"{self.filename or '<spec>'}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span
    hint: str | None = None


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """``did you mean 'x'?`` for the closest candidate, or None when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"did you mean '{close[0]}'?" if close else None


#: the longest source line a diagnostic shows, in characters; a longer one is cut around the caret
MAX_LINE = 200
#: the most diagnostics ``str(SpecError)`` renders; the rest are counted
MAX_SHOWN = 20


def visible(char: str) -> str:
    """``char`` as it is safe to show on a terminal: C0/C1 control characters (ESC, BEL, CSI...) and DEL
    escaped as ``\\x1b``/``\\u009b``, a tab kept, everything else as it is."""
    code = ord(char)
    if char == "\t" or not (code < 0x20 or 0x7f <= code < 0xa0):
        return char
    return f"\\x{code:02x}" if code < 0x100 and code != 0x9b else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control character escaped (see :func:`visible`); newlines too."""
    return "".join(visible(c) if c != "\t" else "\\t" for c in text)


def _shorten(text: str, limit: int) -> str:
    """``text``, or its beginning and end around `` ... `` when longer than ``limit``."""
    if len(text) <= limit:
        return text
    keep = limit - 5
    return f"{text[:keep * 3 // 4]} ... {text[len(text) - keep // 4:]}"


def render(diagnostic: Diagnostic, source: str | None) -> str:
    """The diagnostic as ``file:line:col: error: message; hint``, then its source line and a caret line
    under the span (at least one ``^``); just the first line when the source line is unknown. Control
    characters are shown escaped, and a source line longer than :data:`MAX_LINE` is cut to the part around
    the caret (``...`` marks a cut), the caret still under the character it points at."""
    span = diagnostic.span
    message = diagnostic.message + (f"; {diagnostic.hint}" if diagnostic.hint else "")
    head = escape(_shorten(f"{span}: error: {message}", 2 * MAX_LINE))
    lines = source.split("\n") if source is not None else []
    if not 1 <= span.line <= len(lines):
        return head
    text = lines[span.line - 1].rstrip("\r")
    start = max(span.column - 1, 0)                                   # [start, end): 0-based characters
    end = max((span.end_column if span.end_line == span.line else len(text) + 1) - 1, start + 1)
    first = 0 if len(text) <= MAX_LINE else max(0, start - MAX_LINE // 4)
    shown = [visible(c) for c in text[first:first + MAX_LINE]]
    count, width = 0, 0
    while count < len(shown) and width + len(shown[count]) <= MAX_LINE:
        width += len(shown[count])
        count += 1
    count = max(count, min(start - first + 1, len(shown)))           # the caret's character is shown
    last = first + count
    line = ("..." if first else "") + "".join(shown[:count]) + ("..." if last < len(text) else "")
    pad = " " * (3 if first else 0) + "".join("\t" if s == "\t" else " " * len(s)
                                               for s in shown[:start - first])
    pad += " " * max(0, start - len(text))                           # past the end of the line
    marked = sum(len(s) for s in shown[start - first:min(end, last) - first])
    if last >= len(text):
        marked += max(0, end - max(len(text), start))
    return f"{head}\n{INDENT}{line}\n{INDENT}{pad}{'^' * max(1, marked)}"


class SpecError(PeftcError, ValueError):
    """One or more mistakes in a spec. ``diagnostics`` are sorted by position; ``line``, ``column`` and
    ``filename`` are the first one's; ``str()`` renders the first :data:`MAX_SHOWN` of them and counts
    the rest."""

    def __init__(self, diagnostics: Iterable[Diagnostic], source: str | None = None):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.span.line, d.span.column))
        if not self.diagnostics:
            raise ValueError("a SpecError needs at least one diagnostic")
        self.source = source
        first = self.diagnostics[0].span
        self.line, self.column, self.filename = first.line, first.column, first.filename
        shown = [render(d, source) for d in self.diagnostics[:MAX_SHOWN]]
        more = len(self.diagnostics) - MAX_SHOWN
        if more > 0:
            shown.append(f"... and {more} more error{'s' if more > 1 else ''}")
        super().__init__("\n".join(shown))

    @classmethod
    def at(cls, span: Span, message: str, source: str | None, hint: str | None = None) -> "SpecError":
        """A SpecError with one diagnostic, for code that finds a mistake after parsing."""
        return cls([Diagnostic(message, span, hint)], source)


# ── sizes a statement asks for ────────────────────────────────────────────────────────────────────────

def memory_bytes() -> int:
    """The memory an allocation can hope for: the kernel's MemAvailable (or, without /proc, the physical
    memory), capped by a cgroup v2 limit when the process runs under one."""
    have = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if have is None:
        try:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            have = 1 << 62
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            limit = fh.read().strip()
        if limit.isdigit():
            have = min(have, int(limit))
    except OSError:
        pass
    return have


def size_text(count: int) -> str:
    """A byte count for people: ``3.7 TiB``."""
    value, unit = float(count), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, name
    return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def check_allocation(statement, source: str | None, parameters: int, where: str, hint: str,
                     itemsize: int = 4) -> None:
    """Refuse, before anything is allocated, a statement whose new parameters (``parameters`` of
    ``itemsize`` bytes, float32 by default) cannot fit in the memory there is: a SpecError at the statement
    naming it and the bytes it would need. ``where`` says what the parameters go into ("on 8 linears")."""
    need = parameters * itemsize
    have = memory_bytes()
    if need > have:
        raise SpecError.at(statement.span, f"'{statement}' would allocate {parameters:,} parameters {where}: "
                           f"{need:,} bytes ({size_text(need)}), more than the {size_text(have)} of memory "
                           "available", source, hint)
