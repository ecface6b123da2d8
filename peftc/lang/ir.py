"""The spec IR: what :func:`peftc.lang.spec.parse` builds and the compiler reads. A :class:`Spec` is its
:class:`Statement` s, each a method keyword, its :class:`Target` s and its options; spans (and other records
of how a thing was written) take no part in equality, so ``parse(spec.format()) == spec``."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

from peftc.lang.diagnostics import Span
from peftc.lang.options import quote
from peftc.methods import METHODS


class Options(Mapping):
    """A read-only, hashable mapping that, unlike MappingProxyType, pickles and deep-copies (a
    CompiledModel holds its Spec)."""

    def __init__(self, items: Mapping[str, Any]):
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True)
class Target:
    kind: str                                   # "role" | "glob" | "regex"
    value: str                                  # role word, glob text (unescaped), or regex as written
    span: Span = field(compare=False)

    def __str__(self) -> str:
        return {"role": self.value, "glob": quote(self.value), "regex": f"/{self.value}/"}[self.kind]


@dataclass(frozen=True)
class LayerSelection:
    """``layers=0..3,8`` as written: inclusive ``(first, last)`` parts, a single index ``i`` as ``(i, i)``."""
    parts: tuple[tuple[int, int], ...]

    def contains(self, index: int) -> bool:
        return any(first <= index <= last for first, last in self.parts)

    def indices(self, n_layers: int) -> tuple[int, ...]:
        """The selected indices below ``n_layers``, ascending."""
        return tuple(i for i in range(n_layers) if self.contains(i))

    def __str__(self) -> str:
        return ",".join(str(a) if a == b else f"{a}..{b}" for a, b in self.parts)


@dataclass(frozen=True)
class Statement:
    method: str
    leading: str | None
    targets: tuple[Target, ...]
    options: Mapping[str, Any]                  # every declared option, defaults filled in
    explicit: frozenset[str] = field(compare=False)        # the options the user wrote
    option_spans: Mapping[str, Span] = field(compare=False)  # key=value span of each written option
    span: Span = field(compare=False)

    def __str__(self) -> str:
        """Normalized: targets joined by ', ', then every option that is not None, in declaration order."""
        spec = METHODS[self.method]
        words = [self.method, *([self.leading] if self.leading else [])]
        words += [", ".join(str(t) for t in self.targets)] if self.targets else []
        words += [f"{o.name}={o.format(self.options[o.name])}" for o in spec.options
                  if self.options[o.name] is not None]
        return " ".join(words)


@dataclass(frozen=True)
class Spec:
    statements: tuple[Statement, ...]
    source: str = field(default="", compare=False)
    filename: str | None = field(default=None, compare=False)

    def format(self) -> str:
        """One normalized statement per line; ``parse(spec.format()) == spec``."""
        return "".join(f"{s}\n" for s in self.statements)
