"""``lora``: y = W x + s · B(A(dropout(x))), s = alpha/r (alpha/sqrt(r) with rslora), B zero-initialised.

Inserted as aten ops after each selected linear; the A and B matrices live in a small module
``peftc_lora_<i>`` on the graph module. ``fold`` merges s·B·A into the base weight and removes the branch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.analysis import LinearSite
from peftc.diagnostics import SpecError
from peftc.errors import PassError
from peftc.passmanager import CompileContext, Pass, PassResult, register
from peftc.select import select_linears

aten = torch.ops.aten


class LoraWeights(nn.Module):
    """The two low-rank factors of one LoRA site, shaped as in HF PEFT (A: r×in, B: out×r)."""

    def __init__(self, in_features: int, out_features: int, r: int, init: str):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:  # HF PEFT's default: kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "random":  # HF PEFT's init_lora_weights=False: B as well keeps nn.Linear's init
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))


@dataclass
class LoraRecord:
    statement: int
    site: LinearSite
    module: str                 # attribute name of the LoraWeights on the graph module
    r: int
    alpha: float
    dropout: float
    rslora: bool
    init: str = "zero"
    nodes: list[str] = field(default_factory=list)   # inserted nodes, in graph order; the last is the sum
    method: str = "lora"

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        weights = gm.get_submodule(self.module)
        return {"lora_A": weights.lora_A, "lora_B": weights.lora_B}


@register
class LoraPass(Pass):
    keyword = "lora"
    rank = 60

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        opts = statement.options
        sites = select_linears(statement, ctx.sites, ctx.spec)
        _check_overlap(ctx, statement, sites)
        graph = ctx.gm.graph
        nodes = {n.name: n for n in graph.nodes}
        for site in sites:
            linear = nodes[site.node]
            x = linear.args[0] if site.kind == "linear" else linear.args[1]
            record = LoraRecord(statement=index, site=site, module=f"peftc_lora_{_count(ctx)}",
                                r=opts["r"], alpha=float(opts["alpha"]), dropout=float(opts["dropout"]),
                                rslora=bool(opts["rslora"]), init=opts["init"])
            ctx.add_module(record.module, LoraWeights(site.in_features, site.out_features,
                                                      record.r, opts["init"]))
            with graph.inserting_before(linear.next):
                a = graph.get_attr(f"{record.module}.lora_A")
                b = graph.get_attr(f"{record.module}.lora_B")
                h = x
                inserted = [a, b]
                if record.dropout > 0:
                    h = graph.call_function(aten.dropout.default, (x, record.dropout, False))
                    inserted.append(h)
                down = graph.call_function(aten.linear.default, (h, a))
                up = graph.call_function(aten.linear.default, (down, b))
                scaled = graph.call_function(aten.mul.Tensor, (up, record.scale))
                total = graph.call_function(aten.add.Tensor, (linear, scaled))
                inserted += [down, up, scaled, total]
            linear.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
            for node in inserted:
                ctx.tag(node, self.keyword, statement, index)
            record.nodes = [n.name for n in inserted]
            ctx.records.append(record)
        return PassResult(ctx.gm, modified=True)

    @staticmethod
    def fold(gm: GraphModule, record: LoraRecord) -> None:
        """Merge one LoRA site into its base weight and remove the branch from ``gm``."""
        nodes = {n.name: n for n in gm.graph.nodes}
        linear = nodes[record.site.node]
        weights = gm.get_submodule(record.module)
        delta = record.scale * (weights.lora_B.detach() @ weights.lora_A.detach())
        if record.site.kind == "conv1d":
            delta = delta.T
        if not torch.isfinite(delta).all():
            raise PassError(f"LoRA weights of {record.site.path} contain NaN or inf; refusing to merge")
        weight_node = linear.args[1] if record.site.kind == "linear" else linear.args[2]
        merged = nn.Parameter(gm.get_parameter(weight_node.target).detach() + delta, requires_grad=False)
        if len(weight_node.users) > 1:   # a tied weight: give this linear its own merged copy
            target = f"{record.module}_merged_weight"
            gm.register_parameter(target, merged)
            with gm.graph.inserting_before(weight_node.next):
                own = gm.graph.get_attr(target)
            linear.replace_input_with(weight_node, own)
        else:
            owner, _, name = weight_node.target.rpartition(".")
            setattr(gm.get_submodule(owner), name, merged)
        total = nodes[record.nodes[-1]]
        total.replace_all_uses_with(linear)
        for name in reversed(record.nodes):
            gm.graph.erase_node(nodes[name])
        gm.delete_submodule(record.module)


def _count(ctx: CompileContext) -> int:
    return sum(1 for r in ctx.records if r.method == "lora")


def _check_overlap(ctx: CompileContext, statement, sites: list[LinearSite]) -> None:
    taken = {r.site.node: r for r in ctx.records if r.method == "lora"}
    for site in sites:
        if site.node in taken:
            first = ctx.spec.statements[taken[site.node].statement]
            raise SpecError.at(statement.span, f"this lora statement adapts {site.path} again; "
                               f"line {first.span.line} (column {first.span.column}) already does",
                               ctx.spec.source)
