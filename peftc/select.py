"""Resolve a statement's targets (role words, globs, regexes, ``layers=``, ``exclude=``) to linear sites.

A statement that selects nothing is an error naming the statement and what the model does have."""
from __future__ import annotations

import re
from fnmatch import fnmatchcase

from .analysis import ATTENTION_ROLES, FFN_ROLES, LinearSite, ModelSites
from .diagnostics import SpecError

#: role words that stand for several roles; "all-linear" (and quant's "base") is every linear but the head
GROUPS = {"attn": ATTENTION_ROLES, "ffn": FFN_ROLES}
EVERY_LINEAR = ("all-linear", "base")


def _fused_hint(sites: ModelSites) -> str | None:
    fused = [s for s in sites.linears if s.role == "qkv"]
    if not fused:
        return None
    glob = re.sub(r"\.\d+\.", ".*.", fused[0].path, count=1)
    return (f"this model computes q, k and v in one fused projection ({fused[0].path}); adapting a "
            f"single slice of it is not supported yet: target the whole projection by path, e.g. \"{glob}\"")


def _matches(target, linears: list[LinearSite]) -> list[LinearSite]:
    if target.kind == "glob":
        return [s for s in linears if fnmatchcase(s.path, target.value)]
    if target.kind == "regex":
        pattern = re.compile(target.value)
        return [s for s in linears if pattern.fullmatch(s.path)]
    if target.value in EVERY_LINEAR:
        return [s for s in linears if s.role != "head"]
    roles = GROUPS.get(target.value, (target.value,))
    return [s for s in linears if s.role in roles]


def _select_target(target, sites: ModelSites, spec, method: str) -> list[LinearSite]:
    if target.kind == "role" and target.value == "embed":
        raise SpecError.at(target.span, f"{method} on the token embedding is not supported yet", spec.source)
    found = _matches(target, sites.linears)
    if not found and target.kind == "role":
        hint = _fused_hint(sites) if target.value in ("q", "k", "v", "attn") else None
        raise SpecError.at(target.span, f"the model has no '{target.value}' linears; it has "
                           f"{sites.summary()}", spec.source, hint=hint)
    return found


def select_linears(statement, sites: ModelSites, spec) -> list[LinearSite]:
    """The linear sites a statement selects, in graph order."""
    chosen: dict[str, LinearSite] = {}
    for target in statement.targets:
        for site in _select_target(target, sites, spec, statement.method):
            chosen[site.node] = site
    layers = statement.options.get("layers")
    if layers is not None:
        chosen = {k: s for k, s in chosen.items() if s.layer is not None and layers.contains(s.layer)}
    for target in statement.options.get("exclude") or ():
        for site in _matches(target, sites.linears):
            chosen.pop(site.node, None)
    if not chosen:
        raise SpecError.at(statement.span, f"'{statement}' selects nothing in the model; the model has "
                           f"{sites.summary()}", spec.source)
    order = {s.node: i for i, s in enumerate(sites.linears)}
    return sorted(chosen.values(), key=lambda s: order[s.node])
