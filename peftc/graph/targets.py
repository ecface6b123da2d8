"""Resolve a statement's targets (role words, globs, regexes, ``layers=``, ``exclude=``) to linear sites, and
for a method that adapts them (lora) to the stacked expert weights of mixture-of-experts blocks: the role word
``experts``, or a glob or regex matching a parameter's path (``model.layers.0.mlp.experts.down_proj``).

A statement that selects nothing is an error naming the statement and what the model does have."""
from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from peftc.graph.analysis import ATTENTION_ROLES, FFN_ROLES, LinearSite, ModelSites
from peftc.lang.diagnostics import SpecError

#: role words that stand for several roles; "all-linear" (and quant's "base") is every linear but the head
#: and the mixture-of-experts routers, and never the stacked expert weights: one meaning on every model.
#: HF PEFT 0.21's all-linear names nn.Linear modules, which leaves both out on Qwen2-MoE, but on Mixtral and
#: Qwen3-MoE it first maps all-linear through transformers 4's module names (w1/w2/w3, gate) and so adapts
#: their routers and experts too (tests/graph/test_moe.py pins this; docs/methods.md says how to write that)
GROUPS = {"attn": ATTENTION_ROLES, "ffn": FFN_ROLES}
EVERY_LINEAR = ("all-linear", "base")
NOT_EVERY_LINEAR = ("head", "router", "experts")
EXPERTS = "experts"


@dataclass
class Selection:
    """A selected linear, whole (``roles`` None) or only the output slices of some roles of a fused
    projection (``roles`` such as ("q", "v") on GPT-2's c_attn)."""
    site: LinearSite
    roles: tuple[str, ...] | None = None

    def features(self) -> list[tuple[str, tuple[int, ...]]]:
        """(role, output features) per adapted slice; one ("", all features) for a whole linear."""
        if self.roles is None:
            return [("", tuple(range(self.site.out_features)))]
        return [(role, self.site.slices[role]) for role in self.roles]

    def overlaps(self, other: "Selection") -> bool:
        if self.site.node != other.site.node:
            return False
        return self.roles is None or other.roles is None or bool(set(self.roles) & set(other.roles))

    def __str__(self) -> str:
        return self.site.path if self.roles is None else f"{self.site.path} [{','.join(self.roles)}]"


def _matches(target, linears: list[LinearSite]) -> list[Selection]:
    if target.kind == "glob":
        return [Selection(s) for s in linears if fnmatchcase(s.path, target.value)]
    if target.kind == "regex":
        pattern = re.compile(target.value)
        return [Selection(s) for s in linears if pattern.fullmatch(s.path)]
    if target.value in EVERY_LINEAR:
        return [Selection(s) for s in linears if s.role not in NOT_EVERY_LINEAR]
    roles = GROUPS.get(target.value, (target.value,))
    found = []
    for s in linears:
        if s.role in roles:
            found.append(Selection(s))
        elif s.slices and set(s.slices) & set(roles):
            found.append(Selection(s, tuple(r for r in s.slices if r in roles)))
    return found


def _candidates(sites: ModelSites, experts: bool) -> list[LinearSite]:
    return sites.linears + sites.experts if experts else sites.linears


def _select_target(target, sites: ModelSites, spec, method: str, experts: bool) -> list[Selection]:
    if target.kind == "role" and target.value == "embed":
        raise SpecError.at(target.span, f"{method} on the token embedding is not supported yet", spec.source)
    if target.kind == "role" and target.value == EXPERTS and not experts:
        raise SpecError.at(target.span, f"{method} on the stacked expert weights is not supported yet (lora "
                           "adapts them, as HF PEFT 0.21 does only with a LoRA's target_parameters)", spec.source)
    found = _matches(target, _candidates(sites, experts))
    if not found and target.kind == "role":
        what = (": no mixture-of-experts block with stacked expert weights" if target.value == EXPERTS
                else " linears")
        raise SpecError.at(target.span, f"the model has no '{target.value}'{what}"
                           f"{_experts_hint(target.value, sites, experts)}; it has {sites.summary()}", spec.source)
    return found


def _experts_hint(word: str, sites: ModelSites, experts: bool) -> str:
    """Where the MLPs are only stacked expert weights (Mixtral, Qwen3-MoE), say so: gate/up/down name linears."""
    if word not in FFN_ROLES + ("ffn",) or not sites.experts:
        return ""
    how = "'lora experts' adapts" if experts else "only lora adapts ('lora experts')"
    return f": its MLPs are stacked expert weights ({sites.experts[0].path}, ...), which {how}"


def _union(a: Selection, b: Selection) -> Selection:
    if a.roles is None or b.roles is None:
        return Selection(a.site)
    return Selection(a.site, tuple(r for r in a.site.slices if r in set(a.roles) | set(b.roles)))


def _minus(a: Selection, b: Selection) -> Selection | None:
    """``a`` without what ``b`` selects; None when nothing is left."""
    if b.roles is None:
        return None
    if a.roles is None:
        if not a.site.slices:
            return a
        a = Selection(a.site, tuple(a.site.slices))
    left = tuple(r for r in a.roles if r not in b.roles)
    return Selection(a.site, left) if left else None


def select(statement, sites: ModelSites, spec, *, experts: bool = False) -> list[Selection]:
    """What a statement selects, in graph order (linears, then stacked expert weights when ``experts``):
    role words on a fused projection select its slices."""
    candidates = _candidates(sites, experts)
    chosen: dict[str, Selection] = {}
    for target in statement.targets:
        for found in _select_target(target, sites, spec, statement.method, experts):
            node = found.site.node
            chosen[node] = _union(chosen[node], found) if node in chosen else found
    layers = statement.options.get("layers")
    if layers is not None:
        chosen = {k: s for k, s in chosen.items() if s.site.layer is not None and layers.contains(s.site.layer)}
    attn = statement.options.get("attn")
    if attn is not None:
        chosen = {k: s for k, s in chosen.items() if s.site.attention in (None, attn)}
    for target in statement.options.get("exclude") or ():
        for found in _matches(target, candidates):
            node = found.site.node
            if node in chosen:
                rest = _minus(chosen[node], found)
                if rest is None:
                    del chosen[node]
                else:
                    chosen[node] = rest
    if not chosen:
        raise SpecError.at(statement.span, f"'{statement}' selects nothing in the model; the model has "
                           f"{sites.summary()}", spec.source)
    order = {s.node: i for i, s in enumerate(candidates)}
    return sorted(chosen.values(), key=lambda s: order[s.site.node])


def select_linears(statement, sites: ModelSites, spec) -> list[LinearSite]:
    """The linear modules a statement selects, whole, in graph order (for methods that act on modules)."""
    return [s.site for s in select(statement, sites, spec)]
