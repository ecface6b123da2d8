"""Trainable copies of base parameters, for methods that train weights the model already has (bitfit,
full). The compiled model reads its own copy, so the user's model object is never changed by training;
a linear without a bias gets a zero one when a method needs it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.compiler.record import Record
from peftc.graph.analysis import LinearSite, weight_of
from peftc.errors import PassError
from peftc.quant.rewrite import is_quantized, set_bias

aten = torch.ops.aten


@dataclass
class OwnedRecord(Record):
    """Parameters of one linear that a method trains: ``names`` of its params (``weight``, ``bias``)."""
    statement: int
    site: LinearSite
    module: str
    method: str
    names: tuple[str, ...]
    nodes: list[str] = field(default_factory=list)

    foldable: ClassVar[bool] = True     # merge() keeps the trained copies as the model's frozen weights

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        owner = gm.get_submodule(self.module)
        return {name: getattr(owner, name) for name in self.names}

    def fold(self, gm: GraphModule) -> None:
        freeze(gm, self)

    def folded_weights(self) -> dict[str, str | None]:
        """The trained copies, each with the base weight it replaces (None for a bias the linear lacked)."""
        base = {"weight": self.site.weight, "bias": self.site.bias}
        return {f"{self.module}.{name}": base[name] for name in self.names}


def own(ctx, site: LinearSite, method: str, statement, index: int, weight: bool, bias: bool) -> OwnedRecord:
    """Give ``site`` trainable copies of its weight and/or bias (a zero bias when it has none)."""
    graph = ctx.gm.graph
    nodes = {n.name: n for n in graph.nodes}
    linear = nodes[site.node]
    module = nn.Module()
    name = ctx.module_name(method)
    record = OwnedRecord(index, site, name, method, tuple(n for n, want in (("weight", weight), ("bias", bias))
                                                          if want))
    inserted: list[Node] = []
    quantized = is_quantized(linear)       # a quantized base has no float weight to copy or take a dtype from
    if quantized and weight:
        raise PassError(f"{site.path} is quantized by a quant statement; {method} cannot train its weight")
    reader, weight_node = (None, None) if quantized else weight_of(linear, site.kind)
    base_weight = None if quantized else ctx.value(weight_node.target).detach()
    if weight:
        module.weight = nn.Parameter(base_weight.clone())
    if bias:
        value = (ctx.value(site.bias).detach().clone() if site.bias is not None
                 else torch.zeros(site.out_features, dtype=torch.float32 if quantized else base_weight.dtype))
        module.bias = nn.Parameter(value)
    ctx.add_module(name, module)
    if weight:
        with graph.inserting_before(reader):
            new = graph.get_attr(f"{name}.weight")
        reader.replace_input_with(weight_node, new)
        inserted.append(new)
    if bias:
        inserted += _rewire_bias(ctx, site, linear, nodes, f"{name}.bias")
    for node in inserted:
        ctx.tag(node, method, statement, index)
    record.nodes = [n.name for n in inserted]
    return record


def _rewire_bias(ctx, site: LinearSite, linear: Node, nodes: dict, target: str) -> list[Node]:
    graph = ctx.gm.graph
    with graph.inserting_before(linear):
        new = graph.get_attr(target)
    if site.bias is not None:
        user = nodes[site.output] if site.output else linear
        old = next(a for a in user.all_input_nodes if a.op == "get_attr" and a.target == site.bias)
        user.replace_input_with(old, new)
        return [new]
    if site.kind == "linear":                       # aten.linear(x, W) -> aten.linear(x, W, b), or quantized
        set_bias(linear, new)
        return [new]
    tip = ctx.output_of(site.node)                  # x @ W.T: add the bias after it
    with graph.inserting_after(tip):
        added = graph.call_function(aten.add.Tensor, (tip, new))
    ctx.replace_output(site.node, added)
    return [new, added]


def freeze(gm: GraphModule, record: OwnedRecord) -> None:
    """Merge: the trained copies become plain (frozen) weights of the model."""
    for param in record.parameters(gm).values():
        param.requires_grad_(False)
        if not torch.isfinite(param).all():
            raise PassError(f"the trained parameters of {record.key} contain NaN or inf; refusing to merge")


def check_overlap(ctx, statement, sites: list[LinearSite], method: str, what: str) -> None:
    """Two statements owning the same parameter of a linear are an error naming both lines."""
    for site in sites:
        for record in ctx.records:
            if isinstance(record, OwnedRecord) and record.site.node == site.node and set(record.names) & set(what):
                ctx.refuse_reclaim(statement, record, f"trains the {'/'.join(what)} of {site.path}",
                                   "already trains", joiner=", which ", note=f", {record.method}")
