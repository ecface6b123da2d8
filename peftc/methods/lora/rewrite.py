"""``lora``: y = W x + s · B(A(dropout(x))), s = alpha/r (alpha/sqrt(r) with rslora), B zero-initialised.

Inserted as aten ops after each selected linear; the A and B matrices live in a small module
``peftc_lora_<i>`` on the graph module. On a fused projection (GPT-2's c_attn, Phi-3's qkv_proj), role
words adapt only their output slices: each role gets its own rank-r LoRA, which together are one LoRA
on the module with a block-diagonal B (how HF PEFT's files hold it). Several LoRAs on one linear chain
their sums. After the last lora statement, the A projections of sites that read the same input (q, k and
v; gate and up) become one matmul (``fuse_shared_inputs``). ``fold`` merges s·B·A into the base weight and
removes the branch. On stacked expert weights (role ``experts``) the LoRA is one per expert, added to the
weight where the graph reads it, as HF PEFT's target_parameters LoRA is (:mod:`peftc.methods.lora.experts`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.compiler.record import Record
from peftc.graph.analysis import LinearSite, input_of, weight_of
from peftc.lang.diagnostics import SpecError, check_allocation
from peftc.errors import PassError
from peftc.graph.rewrite import remove_branch, set_weight
from peftc.compiler.passmanager import CompileContext, Pass, PassResult, register
from peftc.graph.targets import Selection, select
from peftc.methods.lora import experts

aten = torch.ops.aten

#: compute the A projections of LoRA sites with a shared input as one matmul; off, each site has its own
FUSE_SHARED_INPUTS = True


class LoraWeights(nn.Module):
    """The low-rank factors of one LoRA site. A whole linear has A: r×in and B: out×r, as in HF PEFT.
    Slices of a fused projection (roles 1..n) have one rank-r LoRA each, stored stacked: A is (n·r)×in
    and B is (Σ out_i)×r; ``perm`` places the block-diagonal B_full = diag(B_1..B_n) on the right rows.
    Stacked expert weights (``experts`` E > 1) have a rank-r LoRA per expert in HF PEFT's layout: A is
    (E·r)×in and B is out×(r·E) (:mod:`peftc.methods.lora.experts`)."""

    def __init__(self, in_features: int, out_features: int, blocks: list[tuple[str, tuple[int, ...]]],
                 r: int, init: str, experts: int = 1):
        super().__init__()
        rows = sum(len(features) for _, features in blocks)
        self.lora_A = nn.Parameter(torch.empty(r * len(blocks) * experts, in_features))
        self.lora_B = nn.Parameter(torch.zeros(rows, r * experts))
        if init == "gaussian":   # std 1/r with r the rank of each expert's LoRA, as HF PEFT's
            nn.init.normal_(self.lora_A, std=1 / r)
        else:  # HF PEFT's default: kaiming-uniform A, zero B
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "random":  # HF PEFT's init_lora_weights=False: B as well keeps nn.Linear's init
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        if blocks[0][0]:   # slices of a fused projection
            perm = torch.full((out_features,), rows, dtype=torch.long)   # row `rows` is all zeros
            offset = 0
            for _, features in blocks:
                perm[list(features)] = torch.arange(offset, offset + len(features))
                offset += len(features)
            self.register_buffer("perm", perm)


def full_b(b: torch.Tensor, perm: torch.Tensor, sizes: list[int], r: int, ops=None):
    """B_full (out × n·r) from the stacked per-role B ((Σ out_i) × r): block-diagonal, rows placed by
    ``perm``. ``ops`` emits the same computation as graph nodes (see ``_GraphOps``)."""
    ops = ops or _EagerOps()
    n, pieces, offset = len(sizes), [], 0
    for i, size in enumerate(sizes):
        block = ops.slice(b, offset, offset + size)
        pieces.append(ops.pad(block, [i * r, (n - 1 - i) * r]))
        offset += size
    stacked = ops.pad(ops.cat(pieces), [0, 0, 0, 1])             # one zero row for unadapted features
    return ops.index_select(stacked, perm)


class _EagerOps:
    def slice(self, x, start, stop):
        return x[start:stop]

    def pad(self, x, pad):
        return torch.nn.functional.pad(x, pad)

    def cat(self, xs):
        return torch.cat(xs, 0)

    def index_select(self, x, index):
        return x.index_select(0, index)


class _GraphOps:
    def __init__(self, graph, emitted: list):
        self.graph, self.emitted = graph, emitted

    def _call(self, target, args):
        node = self.graph.call_function(target, args)
        self.emitted.append(node)
        return node

    def slice(self, x, start, stop):
        return self._call(aten.slice.Tensor, (x, 0, start, stop))

    def pad(self, x, pad):
        return self._call(aten.constant_pad_nd.default, (x, pad, 0.0))

    def cat(self, xs):
        return self._call(aten.cat.default, (xs, 0))

    def index_select(self, x, index):
        return self._call(aten.index_select.default, (x, 0, index))


@dataclass
class LoraRecord(Record):
    statement: int
    site: LinearSite
    module: str                 # attribute name of the LoraWeights on the graph module
    r: int
    alpha: float
    dropout: float
    rslora: bool
    init: str = "zero"
    roles: tuple[str, ...] | None = None              # slices of a fused projection; None: the whole linear
    blocks: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)   # inserted nodes, in graph order; the last is the sum
    down: str = ""     # the node of the A projection: linear(x, A), or its slice of a fused one
    method: str = "lora"
    foldable: ClassVar[bool] = True

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def key(self) -> str:
        """The site's name in ``adapter_parameters()``: the module path, with the roles for slices."""
        return self.site.path if self.roles is None else f"{self.site.path}[{','.join(self.roles)}]"

    @property
    def hf_rank(self) -> int:
        """The rank of this LoRA as one dense LoRA on the module (what HF PEFT's files hold)."""
        return self.r * len(self.blocks)

    def parameters(self, gm: GraphModule) -> dict[str, nn.Parameter]:
        weights = gm.get_submodule(self.module)
        return {"lora_A": weights.lora_A, "lora_B": weights.lora_B}

    def fold(self, gm: GraphModule) -> None:
        LoraPass.fold_site(gm, self)

    def factors(self, gm: GraphModule) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B_full) of the equivalent dense LoRA on the whole module: delta W = scale · B_full · A."""
        weights = gm.get_submodule(self.module)
        a, b = weights.lora_A.detach(), weights.lora_B.detach()
        if self.roles is None:
            return a, b
        return a, full_b(b, weights.perm, [len(f) for _, f in self.blocks], self.r)

    def load_factors(self, gm: GraphModule, a: torch.Tensor, b_full: torch.Tensor) -> None:
        """Set the weights from a dense (A, B_full); B_full must be zero outside this LoRA's blocks."""
        weights = gm.get_submodule(self.module)
        if self.roles is None:
            stacked = b_full
        else:
            rows = [b_full[list(f), i * self.r:(i + 1) * self.r] for i, (_, f) in enumerate(self.blocks)]
            stacked = torch.cat(rows, 0)
            rebuilt = full_b(stacked, weights.perm, [len(f) for _, f in self.blocks], self.r)
            if not torch.equal(rebuilt, b_full):
                raise PassError(f"the LoRA B of {self.site.path} is non-zero outside the "
                                f"{', '.join(self.roles)} slices this spec adapts")
        with torch.no_grad():
            weights.lora_A.copy_(a.to(weights.lora_A.dtype))
            weights.lora_B.copy_(stacked.to(weights.lora_B.dtype))

    def delta(self, gm: GraphModule) -> torch.Tensor:
        """scale · B_full · A, shaped like the module's weight (in×out for a Conv1D)."""
        a, b = self.factors(gm)
        delta = self.scale * (b @ a)
        return delta.T if self.site.kind == "conv1d" else delta


@dataclass
class ExpertLoraRecord(LoraRecord):
    """A LoRA per expert on a stacked expert weight (site kind ``experts``), added to the weight where the
    graph reads it; it has no A projection of an input (``down`` stays empty)."""

    def delta(self, gm: GraphModule) -> torch.Tensor:
        a, b = self.factors(gm)
        return experts.delta(a, b, self.site.experts, self.scale)

    def fold(self, gm: GraphModule) -> None:
        delta = self.delta(gm)
        if not torch.isfinite(delta).all():
            raise PassError(f"LoRA weights of {self.key} contain NaN or inf; refusing to merge")
        owner, _, name = self.site.weight.rpartition(".")
        module = gm.get_submodule(owner)
        weight = getattr(module, name).detach()
        setattr(module, name, nn.Parameter((weight + delta).to(weight.dtype), requires_grad=False))
        remove_branch(gm, self)


@register
class LoraPass(Pass):
    keyword = "lora"
    phase = "low-rank"

    def run(self, ctx: CompileContext, statement, index: int) -> PassResult:
        opts = statement.options
        selections = select(statement, ctx.sites, ctx.spec, experts=True)
        _check_overlap(ctx, statement, selections)
        _check_experts_dropout(ctx, statement, selections)
        r = opts["r"]     # A is (r · slices · experts) × in, B is (adapted outputs) × (r · experts)
        check_allocation(statement, ctx.spec.source, sum(
            max(s.site.experts, 1) * (r * len(s.features()) * s.site.in_features
                                      + r * sum(len(f) for _, f in s.features()))
            for s in selections), f"on {len(selections)} linear{'s' if len(selections) > 1 else ''}",
            "lower r")
        for selection in selections:
            site = selection.site
            record_type = ExpertLoraRecord if site.kind == "experts" else LoraRecord
            record = record_type(statement=index, site=site, module=ctx.module_name("lora"),
                                 r=opts["r"], alpha=float(opts["alpha"]), dropout=float(opts["dropout"]),
                                 rslora=bool(opts["rslora"]), init=opts["init"], roles=selection.roles,
                                 blocks=selection.features())
            base, adapter = ctx.dtypes(site.node)
            ctx.add_module(record.module, LoraWeights(site.in_features, site.out_features, record.blocks,
                                                      record.r, opts["init"], max(site.experts, 1)).to(adapter))
            inserted = (_on_experts if site.kind == "experts" else _on_linear)(ctx, record, base, adapter)
            for node in inserted:
                ctx.tag(node, self.keyword, statement, index)
            record.nodes = [n.name for n in inserted]
            ctx.records.append(record)
        return PassResult(ctx.gm, modified=True)

    @staticmethod
    def finish(ctx: CompileContext) -> PassResult:
        """After the last lora statement: one matmul for the A projections of sites sharing an input."""
        return fuse_shared_inputs(ctx)

    @staticmethod
    def fold_site(gm: GraphModule, record: LoraRecord) -> None:
        """Merge one LoRA site into its base weight and remove the branch from ``gm``."""
        nodes = {n.name: n for n in gm.graph.nodes}
        if nodes[record.down].target is aten.slice.Tensor:
            unfuse(gm, nodes[record.down])
        linear = nodes[record.site.node]
        delta = record.delta(gm)
        if not torch.isfinite(delta).all():
            raise PassError(f"LoRA weights of {record.key} contain NaN or inf; refusing to merge")
        weight = gm.get_parameter(weight_of(linear, record.site.kind)[1].target).detach()
        set_weight(gm, linear, record.site.kind, weight + delta, f"{record.module}_merged_weight")
        remove_branch(gm, record)


def _on_linear(ctx: CompileContext, record: LoraRecord, base: torch.dtype, adapter: torch.dtype) -> list:
    """Add s · B(A(dropout(x))) to the linear's output; returns the inserted nodes, the sum last."""
    graph, site = ctx.gm.graph, record.site
    linear = next(n for n in graph.nodes if n.name == site.node)
    x = ctx.cast(input_of(linear, site.kind), adapter, base)
    tip = ctx.output_of(site.node)
    with graph.inserting_before(tip.next):
        a = graph.get_attr(f"{record.module}.lora_A")
        b = graph.get_attr(f"{record.module}.lora_B")
        inserted = [a, b]
        if record.roles is not None:
            perm = graph.get_attr(f"{record.module}.perm")
            inserted.append(perm)
            b = full_b(b, perm, [len(f) for _, f in record.blocks], record.r, ops=_GraphOps(graph, inserted))
        h = x
        if record.dropout > 0:
            h = graph.call_function(aten.dropout.default, (x, record.dropout, False))
            inserted.append(h)
        down = graph.call_function(aten.linear.default, (h, a))
        up = graph.call_function(aten.linear.default, (down, b))
        scaled = graph.call_function(aten.mul.Tensor, (up, record.scale))
        total = graph.call_function(aten.add.Tensor, (tip, scaled))
        inserted += [down, up, scaled, total]
        if adapter != base:     # HF PEFT: the sum in the adapter's dtype, then the base's dtype again
            total = graph.call_function(aten._to_copy.default, (total,), {"dtype": base})
            inserted.append(total)
    ctx.replace_output(site.node, total, inserted)
    record.down = down.name
    return inserted


def _on_experts(ctx: CompileContext, record: LoraRecord, base: torch.dtype, adapter: torch.dtype) -> list:
    """Read the stacked expert weight as W + s · B_e A_e (per expert e) wherever the graph read W; returns
    the inserted nodes, the adapted weight last."""
    graph, site = ctx.gm.graph, record.site
    weight = next(n for n in graph.nodes if n.name == site.node)
    with graph.inserting_before(weight.next):
        a = graph.get_attr(f"{record.module}.lora_A")
        b = graph.get_attr(f"{record.module}.lora_B")
        shape = (site.experts, site.out_features, site.in_features)
        inserted = [a, b] + experts.emit(graph, weight, a, b, shape, record.r, record.scale,
                                         base if adapter != base else None)
    adapted = inserted[-1]
    weight.replace_all_uses_with(adapted, delete_user_cb=lambda user: user is not adapted)
    return inserted


def _check_experts_dropout(ctx: CompileContext, statement, selections: list[Selection]) -> None:
    stacked = [s.site.path for s in selections if s.site.kind == "experts"]
    if stacked and statement.options["dropout"] > 0:
        raise SpecError.at(statement.span, f"dropout cannot act on the stacked expert weights ({stacked[0]}"
                           f"{', ...' if len(stacked) > 1 else ''}): their LoRA is added to the weight, which "
                           "has no input of its own to drop (HF PEFT refuses lora_dropout there too)",
                           ctx.spec.source, "adapt them in a lora statement without dropout")


def fuse_shared_inputs(ctx: CompileContext) -> PassResult:
    """Compute the A projections of LoRA sites that read the same input node as one matmul: the sites'
    ``lora_A`` (each stays its own parameter) are concatenated, multiplied with the input once, and each
    site's A projection becomes its slice of the result. Only where that is exact: no dropout, and A
    weights of one dtype and device. Tagged with the first site's statement."""
    if not FUSE_SHARED_INPUTS:
        return PassResult(ctx.gm, modified=False)
    graph = ctx.gm.graph
    nodes = {n.name: n for n in graph.nodes}
    position = {n: i for i, n in enumerate(graph.nodes)}
    groups: dict[tuple, list[LoraRecord]] = {}
    for record in ctx.records:
        if record.method == "lora" and record.dropout == 0 and record.site.kind != "experts":
            a = ctx.gm.get_submodule(record.module).lora_A
            groups.setdefault((nodes[record.down].args[0], a.dtype, a.device), []).append(record)
    fused_any = False
    for (x, _, _), records in groups.items():
        if len(records) < 2:
            continue
        records.sort(key=lambda r: position[nodes[r.down]])
        first = nodes[records[0].down]
        weights = [nodes[r.down].args[1] for r in records]
        for weight in weights:              # the get_attr nodes of the A weights move before the fused matmul
            first.prepend(weight)
        with graph.inserting_before(first):
            cat = graph.call_function(aten.cat.default, (weights, 0))
            fused = graph.call_function(aten.linear.default, (x, cat))
        for node in (cat, fused):
            ctx.tag(node, LoraPass.keyword, ctx.spec.statements[records[0].statement], records[0].statement)
        offset = 0
        for record in records:
            down = nodes[record.down]
            rows = ctx.gm.get_submodule(record.module).lora_A.shape[0]
            with graph.inserting_before(down):
                piece = graph.call_function(aten.slice.Tensor, (fused, -1, offset, offset + rows))
            ctx.tag(piece, LoraPass.keyword, ctx.spec.statements[record.statement], record.statement)
            down.replace_all_uses_with(piece)
            graph.erase_node(down)
            record.nodes[record.nodes.index(record.down)] = record.down = piece.name
            offset += rows
        fused_any = True
    return PassResult(ctx.gm, modified=fused_any)


def unfuse(gm: GraphModule, piece) -> None:
    """Undo ``fuse_shared_inputs`` for the fused matmul that ``piece`` slices: each slice node becomes its
    site's own ``linear(x, A)`` again, under its name (merge folds a copy of the graph with the compiled
    model's records, which must keep naming the nodes of both)."""
    fused = piece.args[0]
    x, cat = fused.args
    for weight, user in zip(cat.args[0], sorted(fused.users, key=lambda n: n.args[2])):
        user.target, user.args = aten.linear.default, (x, weight)
    gm.graph.erase_node(fused)
    gm.graph.erase_node(cat)


def _check_overlap(ctx: CompileContext, statement, selections: list[Selection]) -> None:
    taken = [r for r in ctx.records if r.method == "lora"]
    for selection in selections:
        for record in taken:
            if selection.overlaps(Selection(record.site, record.roles)):
                ctx.refuse_reclaim(statement, record, f"adapts {selection} again")
