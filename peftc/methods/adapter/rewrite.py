"""``adapter``: bottleneck adapters. After the attention output projection (``after=attn``) and/or the
MLP down projection (``after=ffn``) of each layer, h ← h + scale · up(act(down(h))) (Houlsby with both,
Pfeiffer with ffn alone); ``parallel=true`` feeds the adapter the sublayer's input instead, h ← h + scale ·
up(act(down(x))). The sublayers are found by role (o, down; their inputs are those of q and of the first MLP
projection), so the statement works on any architecture the analysis labels. The up projection starts at
zero, so a fresh compile changes nothing. Adapters are not linear in the input and stay in the merged graph."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.compiler.record import Record
from peftc.graph.analysis import LinearSite, input_of
from peftc.lang.diagnostics import SpecError, check_allocation
from peftc.compiler.passmanager import CompileContext, Pass, PassResult, register

aten = torch.ops.aten
ACTIVATIONS = {"relu": aten.relu.default, "gelu": aten.gelu.default, "silu": aten.silu.default,
               "tanh": aten.tanh.default}
#: for each sublayer: the roles whose output it adapts, and the roles whose input is the sublayer's input
SUBLAYERS = {"attn": (("o",), ("q", "qkv", "qk", "qv")), "ffn": (("down",), ("gate", "up", "gate_up"))}


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)


@dataclass
class AdapterRecord(Record):
    statement: int
    site: LinearSite            # the projection whose output is adapted (o or down)
    module: str
    after: str                  # "attn" or "ffn"
    nodes: list[str] = field(default_factory=list)
    method: str = "adapter"

    @property
    def key(self) -> str:
        return f"{self.site.path}.adapter"

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        return dict(gm.get_submodule(self.module).named_parameters())


def _by_layer(sites: list[LinearSite], roles) -> dict[int, LinearSite]:
    found: dict[int, LinearSite] = {}
    for site in sites:
        if site.role in roles and site.layer is not None and site.layer not in found:
            found[site.layer] = site
    return found


@register
class AdapterPass(Pass):
    keyword = "adapter"
    phase = "adapters"

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        opts = statement.options
        graph = ctx.gm.graph
        layers = opts["layers"]
        sizes = []          # each adapter: down (hidden → bottleneck) and up (bottleneck → hidden), with biases
        for after in opts["after"]:
            outputs = _by_layer(ctx.sites.linears, SUBLAYERS[after][0])
            sizes += [outputs[i].out_features for i in outputs if layers is None or layers.contains(i)]
        b = opts["bottleneck"]
        check_allocation(statement, ctx.spec.source, sum(2 * h * b + b + h for h in sizes),
                         f"in {len(sizes)} adapter{'s' if len(sizes) != 1 else ''}", "lower bottleneck")
        for after in opts["after"]:
            out_roles, in_roles = SUBLAYERS[after]
            outputs = _by_layer(ctx.sites.linears, out_roles)
            inputs = _by_layer(ctx.sites.linears, in_roles)
            chosen = sorted(i for i in outputs if layers is None or layers.contains(i))
            if not chosen:
                raise SpecError.at(statement.span, f"'{statement}' finds no {after} sublayer to adapt; the model "
                                   f"has {ctx.sites.summary()}", ctx.spec.source)
            for layer in chosen:
                site = outputs[layer]
                if opts["parallel"] and layer not in inputs:
                    raise SpecError.at(statement.span, f"parallel=true needs the input of the {after} sublayer "
                                       f"of layer {layer}, and no {'/'.join(in_roles)} projection was found there",
                                       ctx.spec.source)
                _check_overlap(ctx, statement, site)
                record = AdapterRecord(index, site, ctx.module_name("adapter"),
                                       after)
                base, adapter = ctx.dtypes(site.node)
                ctx.add_module(record.module, BottleneckAdapter(site.out_features, opts["bottleneck"]).to(adapter))
                nodes = {n.name: n for n in graph.nodes}
                tip = ctx.output_of(site.node)
                source = input_of(nodes[inputs[layer].node], inputs[layer].kind) if opts["parallel"] else tip
                with graph.inserting_before(tip.next):
                    attrs = [graph.get_attr(f"{record.module}.{name}")
                             for name in ("down.weight", "down.bias", "up.weight", "up.bias")]
                    inserted = list(attrs)
                    if adapter != base:      # as LoRA: computed in the adapter's dtype, the sum cast back
                        source = graph.call_function(aten._to_copy.default, (source,), {"dtype": adapter})
                        inserted.append(source)
                    down = graph.call_function(aten.linear.default, (source, attrs[0], attrs[1]))
                    act = graph.call_function(ACTIVATIONS[opts["act"]], (down,))
                    up = graph.call_function(aten.linear.default, (act, attrs[2], attrs[3]))
                    scaled = graph.call_function(aten.mul.Tensor, (up, float(opts["scale"])))
                    total = graph.call_function(aten.add.Tensor, (tip, scaled))
                    inserted += [down, act, up, scaled, total]
                    if adapter != base:
                        total = graph.call_function(aten._to_copy.default, (total,), {"dtype": base})
                        inserted.append(total)
                ctx.replace_output(site.node, total, inserted)
                for node in inserted:
                    ctx.tag(node, self.keyword, statement, index)
                record.nodes = [n.name for n in inserted]
                ctx.records.append(record)
        return PassResult(ctx.gm, modified=True)


def _check_overlap(ctx: CompileContext, statement, site: LinearSite) -> None:
    for record in ctx.records:
        if record.method == "adapter" and record.site.node == site.node:
            ctx.refuse_reclaim(statement, record, f"adds a second adapter after {site.path}", "already adds one")

