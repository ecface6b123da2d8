"""The front end: spec text ──lark──▶ Spec (the IR, in :mod:`peftc.lang.ir`; its names are importable
from here too).

A file is cut into statements at newlines and ';' outside "strings", /regexes/ and comments. Each piece
is parsed on its own with peft.lark and checked against each method's declaration (peftc/methods/<keyword>/options.py),
so that every mistake in a file is reported, in source order, in one SpecError."""
from __future__ import annotations

import functools
import importlib.resources
import math
import re
from pathlib import Path
from typing import Any, Iterator

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput

from peftc.lang.diagnostics import Diagnostic, Span, SpecError, did_you_mean, visible
from peftc.lang.ir import LayerSelection, Options, Spec, Statement, Target  # noqa: F401  (the IR, importable here)
from peftc.lang.options import ESCAPES, TYPE_WORDS, MethodSpec, OptionSpec, quote  # noqa: F401  (quote too)
from peftc.methods import METHODS

GRAMMAR = "peft.lark"
#: the largest finite float32: a float option must fit the tensors it ends up in
FLOAT32_MAX = 3.4028234663852886e38
BOM = "\ufeff"


def grammar_text() -> str:
    """peft.lark, package data of ``peftc.lang`` (in a checkout and in an installed wheel alike)."""
    return importlib.resources.files("peftc.lang").joinpath(GRAMMAR).read_text(encoding="utf-8")


@functools.cache
def _parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse(text: str, filename: str | None = None) -> Spec:
    """Parse spec text; raise SpecError listing every mistake in it. A byte-order mark at the start is
    ignored."""
    if text.startswith(BOM):
        text = text[len(BOM):]
    pieces = [_Piece(piece, line, offset, filename) for line, offset, piece in _pieces(text)]
    statements = tuple(s for s in (piece.parse() for piece in pieces) if s is not None)
    errors = [error for piece in pieces for error in piece.errors]
    if errors:
        raise SpecError(errors, text)
    return Spec(statements, text, filename)


def parse_file(path: str | Path) -> Spec:
    """Parse a UTF-8 spec file (a byte-order mark at its start is accepted); its path is the filename in
    spans and diagnostics. Bytes that are not UTF-8 are a SpecError at the line and column they start."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"spec file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        column = len(data[line_start:exc.start].decode("utf-8", errors="replace")) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        raise SpecError.at(Span(line, column, line, column + 1, str(path)),
                           f"not UTF-8 text: {exc.reason} (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                           None, "save the spec as UTF-8") from None
    return parse(text, str(path))


# a "string", a /regex/ or a comment (each possibly unterminated, left for lark to report), a separator,
# or a run of anything else
_CHUNK = re.compile(r'"(?:[^"\\\n]|\\.)*"?|/(?:[^/\\\n]|\\.)*/?|#[^\n]*|[;\n]|[^"/#;\n]+')


def _pieces(text: str) -> Iterator[tuple[int, int, str]]:
    """``(line, column offset, text)`` of each statement-sized piece, blank ones included."""
    line, line_start, start = 1, 0, 0
    for chunk in _CHUNK.finditer(text):
        if chunk.group() in (";", "\n"):
            yield line, start - line_start, text[start:chunk.start()]
            start = chunk.end()
            if chunk.group() == "\n":
                line, line_start = line + 1, chunk.end()
    yield line, start - line_start, text[start:]


_UNTERMINATED = {'"': "string", "/": "regex"}
_EXPECTED = {"_COMMA": "','", "_DOTDOT": "'..'", "_EQ": "'='", "KEY": "key=value", "$END": "end of statement"}


def _expected(names: set[str]) -> str:
    """What the parser would have accepted, in words."""
    if "INT" in names:
        words = ["a value" if "NAME" in names else "an integer"]
    else:
        words = ['a target (a role word, a "glob" or a /regex/)'] if "STRING" in names else []
    words += [text for name, text in _EXPECTED.items() if name in names]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


class _Invalid(Exception):
    """A mistake found while lowering a statement; carries its diagnostic."""

    def __init__(self, message: str, span: Span, hint: str | None = None):
        super().__init__(message)
        self.diagnostic = Diagnostic(message, span, hint)


_KINDS = {"int": ("INT",), "float": ("INT", "FLOAT"), "bool": ("NAME",), "str": ("STRING",), "name": ("NAME",),
          "names": ("NAME",), "layers": ("INT", "range"), "targets": ("NAME", "STRING", "REGEX")}
_TARGET_KINDS = {"NAME": "role", "STRING": "glob", "REGEX": "regex"}


class _Piece:
    """One statement-sized piece of the file: parses it and lowers the tree to a Statement, collecting
    every mistake in it in ``errors`` with spans moved from the piece to the file."""

    def __init__(self, text: str, line: int, offset: int, filename: str | None):
        self.text, self.line, self.offset, self.filename = text, line, offset, filename
        self.errors: list[Diagnostic] = []

    def at(self, column: int, end_column: int) -> Span:
        return Span(self.line, self.offset + column, self.line, self.offset + end_column, self.filename)

    def span(self, node: Token | Tree) -> Span:
        pos = node if isinstance(node, Token) else node.meta
        return self.at(pos.column, pos.end_column)

    def fail(self, message: str, node: Token | Tree | Span, hint: str | None = None) -> None:
        self.errors.append(Diagnostic(message, node if isinstance(node, Span) else self.span(node), hint))

    def parse(self) -> Statement | None:
        try:
            tree = _parser().parse(self.text)
        except UnexpectedInput as error:
            self.syntax_error(error)
            return None
        return self.statement(tree.children[0]) if tree.children else None

    def syntax_error(self, error: UnexpectedInput) -> None:
        try:
            first = next(iter(_parser().lex(self.text)), None)
        except UnexpectedCharacters:
            first = None
        if first is not None and first.type in ("NAME", "KEY") and first.value not in METHODS:
            self.unknown_method(first)
        elif isinstance(error, UnexpectedCharacters):
            char = self.text[error.pos_in_stream]
            if char in _UNTERMINATED:
                self.fail(f"unterminated {_UNTERMINATED[char]}: no closing {char} before the end of the line",
                          self.at(error.column, len(self.text.rstrip()) + 1))
            else:
                self.fail(f"unexpected character '{char}'", self.at(error.column, error.column + 1))
        elif error.token.type == "$END":
            end = error.token.end_column
            self.fail(f"unexpected end of statement; expected {_expected(error.interactive_parser.accepts())}",
                      self.at(end, end + 1))
        else:
            self.fail(f"unexpected '{error.token.value}'; expected {_expected(error.interactive_parser.accepts())}",
                      error.token)

    def unknown_method(self, word: Token) -> None:
        self.fail(f"unknown method '{word.value}'", word,
                  did_you_mean(word.value, METHODS) or f"a statement starts with one of {', '.join(METHODS)}")

    def statement(self, tree: Tree) -> Statement | None:
        word, *rest = tree.children
        method = METHODS.get(word.value)
        if method is None:
            self.unknown_method(word)
            return None
        groups = [list(c.children) for c in rest if c.data == "target_group"]
        leading = self.leading(method, word, groups)
        targets = self.targets(method, word, groups)
        options, spans = self.options(method, word, [c for c in rest if c.data == "option"])
        if self.errors:
            return None
        return Statement(method.keyword, leading, targets, Options(options), frozenset(spans), Options(spans),
                         self.span(tree))

    def leading(self, method: MethodSpec, word: Token, groups: list[list[Token]]) -> str | None:
        """Take the method's leading word (quant's scheme) off the front of the first target group."""
        spec = method.leading
        if spec is None:
            return None
        choices = " or ".join(spec.choices)
        first = groups[0][0] if groups else None
        if first is None or first.type != "NAME" or first.value in method.role_words:
            self.fail(f"{method.keyword} needs its {spec.name} first: {choices}", first or word)
            return None
        if first.value not in spec.choices:
            self.fail(f"unknown {spec.name} '{first.value}' for {method.keyword}; expected {choices}", first,
                      did_you_mean(first.value, spec.choices))
        del groups[0][0]
        if groups[0]:
            self.fail(f"{method.keyword}'s {spec.name} is followed by a space, not ','", groups[0][0],
                      f"write '{method.keyword} {first.value} {groups[0][0].value}'")
        else:
            del groups[0]
        return first.value

    def targets(self, method: MethodSpec, word: Token, groups: list[list[Token]]) -> tuple[Target, ...]:
        for group in groups[1:]:
            self.fail(f"missing ',' before target '{group[0].value}'", group[0])
        tokens = [t for group in groups for t in group]
        if tokens and method.targets == "none":
            self.fail(f"{method.keyword} takes no targets", tokens[0], f"{method.keyword} options: "
                      + ", ".join(method.option_names))
            return ()
        if not tokens:
            if method.targets == "required":
                self.fail(f"{method.keyword} needs targets: role words, \"globs\" or /regexes/", word,
                          "e.g. '" + method.keyword + " q, v'")
            return tuple(Target("role", role, self.span(word)) for role in method.default_targets)
        return tuple(t for t in (self.guarded(self.target, method, token) for token in tokens) if t)

    def guarded(self, convert, *args) -> Any:
        """``convert(*args)``, or None with its mistake recorded."""
        try:
            return convert(*args)
        except _Invalid as invalid:
            self.errors.append(invalid.diagnostic)
            return None

    def target(self, method: MethodSpec, token: Token) -> Target:
        span = self.span(token)
        kind = _TARGET_KINDS[token.type]
        if kind == "role":
            if token.value not in method.role_words:
                owners = [m.keyword for m in METHODS.values() if token.value in m.roles]
                if owners:
                    raise _Invalid(f"role '{token.value}' is only meaningful for {' and '.join(owners)}", span,
                                   did_you_mean(token.value, method.role_words) or "did you mean 'all-linear'?")
                raise _Invalid(f"unknown role '{token.value}'", span, did_you_mean(token.value, method.role_words)
                               or "roles: " + ", ".join(method.role_words))
            return Target(kind, token.value, span)
        self.printable(token, span)
        if kind == "glob":
            value = self.unquote(token)
            if not value:
                raise _Invalid("empty glob", span, 'a glob matches module paths, e.g. "model.layers.*.mlp.up_proj"')
            return Target(kind, value, span)
        value = token.value[1:-1]
        if not value:
            raise _Invalid("empty regex", span, r"a regex matches whole module paths, e.g. /.*\.q_proj/")
        try:
            re.compile(value)
        except re.error as error:
            raise _Invalid(f"invalid regex /{value}/: {error}", span) from None
        except RecursionError:
            raise _Invalid("invalid regex: nested too deeply for Python's regular expressions", span) from None
        return Target(kind, value, span)

    def printable(self, token: Token, span: Span) -> None:
        """Refuse a control character (ESC, BEL, ...) written raw inside a string or a regex: it would reach
        terminals and files as it is, and no module path or prompt text needs one."""
        for i, char in enumerate(token.value):
            if char != "\t" and visible(char) != char:
                raise _Invalid(f"control character {visible(char)} (U+{ord(char):04X}) in a "
                               f"{'string' if token.type == 'STRING' else 'regex'}", self.at(
                                   span.column - self.offset + i, span.column - self.offset + i + 1),
                               "write the text without control characters")

    def unquote(self, token: Token) -> str:
        def escape(match: re.Match) -> str:
            if match.group(1) not in ESCAPES:
                raise _Invalid(f"unknown escape '{match.group()}' in string", self.span(token),
                               "escapes are \\\\ \\\" \\n \\r \\t")
            return ESCAPES[match.group(1)]
        return re.sub(r"\\(.)", escape, token.value[1:-1])

    def options(self, method: MethodSpec, word: Token, nodes: list[Tree]) -> tuple[dict, dict]:
        values: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        for node in nodes:
            key, value = node.children
            option = method.option(key.value)
            if option is None:
                self.fail(f"unknown option '{key.value}' for {method.keyword}", key,
                          did_you_mean(key.value, method.option_names)
                          or f"{method.keyword} options: {', '.join(method.option_names)}")
            elif key.value in spans:
                self.fail(f"option '{key.value}' given twice", key,
                          f"it was first given at column {spans[key.value].column}")
            elif value is None:
                spans[key.value] = self.span(node)
                self.fail(f"missing value after '{key.value}='", key, option.usage)
            else:
                spans[key.value] = self.span(node)
                values[key.value] = self.guarded(self.value, method, option, value.children)
        for option in method.options:
            if option.required and option.name not in spans:
                self.fail(f"{method.keyword} needs option '{option.name}'", word, option.usage)
        return {o.name: values.get(o.name, o.default) for o in method.options}, spans

    def value(self, method: MethodSpec, option: OptionSpec, items: list[Token | Tree]) -> Any:
        where = f"option '{option.name}' of {method.keyword}"
        if len(items) > 1 and option.type not in ("names", "layers", "targets"):
            raise _Invalid(f"{where} takes one value, not a list", self.span(items[1]))
        values = tuple(self.item(method, option, where, item) for item in items)
        if option.type == "layers":
            return LayerSelection(values)
        if option.type not in ("names", "targets"):
            return values[0]
        seen = [str(v) for v in values]
        for i, text in enumerate(seen):
            if text in seen[:i]:
                raise _Invalid(f"{where} lists {text} twice", self.span(items[i]))
        return values

    def item(self, method: MethodSpec, option: OptionSpec, where: str, item: Token | Tree) -> Any:
        kind = item.data if isinstance(item, Tree) else item.type
        written = f"{item.children[0]}..{item.children[1]}" if kind == "range" else str(item)
        span = self.span(item)
        if kind not in _KINDS[option.type] or (option.type == "bool" and written not in ("true", "false")):
            hint = did_you_mean(written, ("true", "false")) if option.type == "bool" else None
            raise _Invalid(f"{where} expects {TYPE_WORDS[option.type]}, got '{written}'", span, hint)
        if option.type == "targets":
            return self.target(method, item)
        if option.type == "layers":
            first, last = (int(item.children[0]), int(item.children[1])) if kind == "range" else (int(item),) * 2
            if first < 0 or last < 0:
                raise _Invalid(f"layer indices cannot be negative, got '{written}'", span)
            if first > last:
                raise _Invalid(f"empty layer range '{written}'", span, f"did you mean '{last}..{first}'?")
            return first, last
        if option.type == "str":
            self.printable(item, span)
            value = self.unquote(item)
        else:
            value = written == "true" if option.type == "bool" else {"int": int, "float": float}.get(option.type, str)(written)
        if option.type == "float" and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise _Invalid(f"{where} must be a finite number within float32 range (|x| <= 3.4e38), "
                           f"got '{written}'", span)
        problem = option.violation(value)
        if problem:
            hint = did_you_mean(value, option.choices) if option.choices and isinstance(value, str) else None
            raise _Invalid(f"{where} {problem}, got '{written}'", span, hint)
        return value
