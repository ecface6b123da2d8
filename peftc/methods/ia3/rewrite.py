"""``ia3``: learned per-feature scales (IA³), as HF PEFT defines them.

A down projection (HF PEFT's "feedforward" module) has its *input* scaled, y = W (l ⊙ x); every other
selected linear has its *output* scaled, y = l ⊙ (W x + b). The scales start at one, so a fresh compile
changes nothing. On a fused projection, role words scale only their output slices (the other features
keep a fixed 1). ``fold`` multiplies the scales into the weight (and the bias of an output-scaled linear)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.compiler.record import Record
from peftc.graph.analysis import LinearSite, input_of, weight_of
from peftc.lang.diagnostics import SpecError
from peftc.errors import PassError
from peftc.graph.rewrite import branch_input, remove_branch, set_weight
from peftc.compiler.passmanager import CompileContext, Pass, PassResult, register
from peftc.graph.targets import Selection, select

aten = torch.ops.aten


class Ia3Scales(nn.Module):
    def __init__(self, size: int, perm: torch.Tensor | None):
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(size))
        if perm is not None:   # slices of a fused projection: index `size` is a fixed one
            self.register_buffer("perm", perm)


@dataclass
class Ia3Record(Record):
    statement: int
    site: LinearSite
    module: str
    feedforward: bool                      # scales the input (down projections) rather than the output
    roles: tuple[str, ...] | None = None
    nodes: list[str] = field(default_factory=list)
    method: str = "ia3"
    foldable: ClassVar[bool] = True

    @property
    def key(self) -> str:
        return self.site.path if self.roles is None else f"{self.site.path}[{','.join(self.roles)}]"

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        return {"ia3_l": gm.get_submodule(self.module).ia3_l}

    def fold(self, gm: GraphModule) -> None:
        Ia3Pass.fold_site(gm, self)

    def full(self, gm: GraphModule) -> torch.Tensor:
        """The scale of every feature (ones outside the adapted slices)."""
        weights = gm.get_submodule(self.module)
        l = weights.ia3_l.detach()
        if self.roles is None:
            return l
        return torch.cat([l, l.new_ones(1)]).index_select(0, weights.perm)

    def load_full(self, gm: GraphModule, full: torch.Tensor) -> None:
        weights = gm.get_submodule(self.module)
        if self.roles is None:
            value = full
        else:
            inside = weights.perm < weights.ia3_l.numel()
            if not torch.equal(full[~inside], torch.ones_like(full[~inside])):
                raise PassError(f"the IA3 scales of {self.site.path} are not 1 outside the "
                                f"{', '.join(self.roles)} slices this spec adapts")
            value = torch.empty_like(weights.ia3_l)
            value[weights.perm[inside]] = full[inside]
        with torch.no_grad():
            weights.ia3_l.copy_(value.to(weights.ia3_l.dtype))


@register
class Ia3Pass(Pass):
    keyword = "ia3"
    phase = "scale"

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        selections = select(statement, ctx.sites, ctx.spec)
        _check_overlap(ctx, statement, selections)
        graph = ctx.gm.graph
        for selection in selections:
            site = selection.site
            feedforward = site.role == "down"
            if feedforward and selection.roles is not None:
                raise SpecError.at(statement.span, f"ia3 scales the input of a down projection; "
                                   f"{site.path} has no input slices", ctx.spec.source)
            size = site.in_features if feedforward else sum(len(f) for _, f in selection.features())
            features = site.in_features if feedforward else site.out_features
            perm = None
            if selection.roles is not None:
                perm = torch.full((features,), size, dtype=torch.long)
                perm[[i for _, f in selection.features() for i in f]] = torch.arange(size)
            record = Ia3Record(index, site, ctx.module_name("ia3"),
                               feedforward, selection.roles)
            base, adapter = ctx.dtypes(site.node)
            ctx.add_module(record.module, Ia3Scales(size, perm).to(adapter))
            nodes = {n.name: n for n in graph.nodes}
            linear = nodes[site.node]
            anchor = input_of(linear, site.kind) if feedforward else ctx.output_of(site.node)
            where = linear if feedforward else anchor.next
            with graph.inserting_before(where):
                scales = graph.get_attr(f"{record.module}.ia3_l")
                inserted = [scales]
                if perm is not None:
                    one = graph.call_function(aten.new_ones.default, (scales, [1]))
                    padded = graph.call_function(aten.cat.default, ([scales, one], 0))
                    perm_node = graph.get_attr(f"{record.module}.perm")
                    scales = graph.call_function(aten.index_select.default, (padded, 0, perm_node))
                    inserted += [one, padded, perm_node, scales]
                # HF PEFT: the features in the scales' dtype, the product back in the base's dtype
                source = anchor
                if adapter != base:
                    source = graph.call_function(aten._to_copy.default, (anchor,), {"dtype": adapter})
                    inserted.append(source)
                scaled = graph.call_function(aten.mul.Tensor, (source, scales))
                inserted.append(scaled)
                if adapter != base:
                    scaled = graph.call_function(aten._to_copy.default, (scaled,), {"dtype": base})
                    inserted.append(scaled)
            if feedforward:
                linear.replace_input_with(anchor, scaled)
            else:
                ctx.replace_output(site.node, scaled, inserted)
            for node in inserted:
                ctx.tag(node, self.keyword, statement, index)
            record.nodes = [n.name for n in inserted]
            ctx.records.append(record)
        return PassResult(ctx.gm, modified=True)

    @staticmethod
    def fold_site(gm: GraphModule, record: Ia3Record) -> None:
        nodes = {n.name: n for n in gm.graph.nodes}
        linear = nodes[record.site.node]
        l = record.full(gm)
        if not torch.isfinite(l).all():
            raise PassError(f"IA3 scales of {record.key} contain NaN or inf; refusing to merge")
        weight = gm.get_parameter(weight_of(linear, record.site.kind)[1].target).detach()
        # weight is out×in (in×out for a Conv1D); scale its input or output features
        out_axis = 1 if record.site.kind == "conv1d" else 0
        axis = 1 - out_axis if record.feedforward else out_axis
        shape = [1, 1]
        shape[axis] = -1
        set_weight(gm, linear, record.site.kind, weight * l.reshape(shape), f"{record.module}_merged_weight")
        if not record.feedforward:
            tip = branch_input(nodes, record)
            for bias_node in _biases(linear, record.site.kind, tip):
                owner, _, name = bias_node.target.rpartition(".")
                bias = gm.get_parameter(bias_node.target).detach()
                setattr(gm.get_submodule(owner), name, nn.Parameter(bias * l, requires_grad=False))
        remove_branch(gm, record)


def _biases(linear, kind: str, tip) -> list:
    """The bias parameters the linear's output carries where the scale applies: the linear's own bias
    argument (its base bias, or the copy bitfit trains), and any bias added after an x @ W.T up to ``tip``."""
    found = []
    arg = linear.args[2] if kind == "linear" and len(linear.args) > 2 else linear.args[0] if kind == "conv1d" else None
    if arg is not None and getattr(arg, "op", None) == "get_attr":
        found.append(arg)
    node = linear
    while node is not tip and len(node.users) == 1:
        node = next(iter(node.users))
        if node.target is aten.add.Tensor and getattr(node.args[1], "op", None) == "get_attr":
            found.append(node.args[1])
    return found


def _check_overlap(ctx: CompileContext, statement, selections: list[Selection]) -> None:
    for selection in selections:
        for record in (r for r in ctx.records if r.method == "ia3"):
            if selection.overlaps(Selection(record.site, record.roles)):
                ctx.refuse_reclaim(statement, record, f"scales {selection} again")
