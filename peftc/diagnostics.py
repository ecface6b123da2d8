"""Source spans, diagnostics and SpecError: every mistake in a spec, rendered like a compiler's.

    samples/bad.peft:2:11: error: unknown option 'aplha' for lora; did you mean 'alpha'?
        lora q, v aplha=16
                  ^^^^^

The compiler reuses this for mistakes only a model reveals (a statement that selects nothing):
``raise SpecError.at(statement.span, "...", spec.source)``."""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

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


def render(diagnostic: Diagnostic, source: str | None) -> str:
    """The diagnostic as ``file:line:col: error: message; hint``, then its source line and a caret line
    under the span (at least one ``^``); just the first line when the source line is unknown."""
    span = diagnostic.span
    message = diagnostic.message + (f"; {diagnostic.hint}" if diagnostic.hint else "")
    head = f"{span}: error: {message}"
    lines = source.split("\n") if source is not None else []
    if not 1 <= span.line <= len(lines):
        return head
    text = lines[span.line - 1].rstrip("\r")
    end = span.end_column if span.end_line == span.line else len(text) + 1
    pad = "".join("\t" if c == "\t" else " " for c in text[:span.column - 1]).ljust(span.column - 1)
    return f"{head}\n{INDENT}{text}\n{INDENT}{pad}{'^' * max(1, end - span.column)}"


class SpecError(ValueError):
    """One or more mistakes in a spec. ``diagnostics`` are sorted by position; ``line``, ``column`` and
    ``filename`` are the first one's; ``str()`` renders them all."""

    def __init__(self, diagnostics: Iterable[Diagnostic], source: str | None = None):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.span.line, d.span.column))
        if not self.diagnostics:
            raise ValueError("a SpecError needs at least one diagnostic")
        self.source = source
        first = self.diagnostics[0].span
        self.line, self.column, self.filename = first.line, first.column, first.filename
        super().__init__("\n".join(render(d, source) for d in self.diagnostics))

    @classmethod
    def at(cls, span: Span, message: str, source: str | None, hint: str | None = None) -> "SpecError":
        """A SpecError with one diagnostic, for code that finds a mistake after parsing."""
        return cls([Diagnostic(message, span, hint)], source)
