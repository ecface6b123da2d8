"""Stacked adapters on one base graph, selected per row by a ``task_ids`` input (the adapter bank's graph).

Each adapter's effect is read out of its own compiled model (:func:`read_effect`): per LoRA site the low-rank
pair of the dense LoRA on the module (``LoraRecord.factors``, the scale folded into B; several lora statements
on one linear side by side in the rank), per IA3 site the scale of every feature (``Ia3Record.full``), and for
a soft prompt or a prefix the keys and values each attention receives at its P positions, a constant past.

:func:`stack_effects` inserts one branch per site into a graph that takes ``task_ids`` (batch,) int64: LoRA
as ``y + (x @ A[task_ids]) @ B[task_ids]`` over stacks padded to the largest rank with zeros, IA3 as
``y * L[task_ids]`` (on the input of a down projection), row 0 (``__base__``) zeros and ones. A row gathers
only its own adapter's factors, so a step costs the same whatever the number of adapters (S-LoRA, Punica).
The branches sit where the passes put theirs (LoRA before IA3), so each row computes what its adapter's own
model computes. Prompt and prefix rows need nothing in the graph: their constant past is the row's cache."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.fx import Node

from peftc.compiler.passmanager import META_KEY, CompileContext
from peftc.errors import PeftcError
from peftc.export.constant_past import attention_inputs, sdpa_nodes
from peftc.graph.analysis import LinearSite, input_of
from peftc.methods.lora.rewrite import ExpertLoraRecord
from peftc.methods.prefix.rewrite import PrefixRecord

aten = torch.ops.aten
#: what one shared base can stack per row; other methods change or add base computation per task
STACKABLE = ("lora", "ia3", "prompt", "prefix")


@dataclass
class Effect:
    """What one adapter adds to the base, read off its compiled model."""
    #: linear node -> [(A (r × in), B (out × r) with the scale folded in)], one pair per lora statement
    lora: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    #: linear node -> the scale of every feature (its input's for a down projection, else its output's)
    ia3: dict[str, torch.Tensor] = field(default_factory=dict)
    #: per attention in graph order, (key, value) of the prompt's or prefix's P positions, (heads, P, head dim)
    past: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def read_effect(model, directory: str | Path) -> Effect:
    """The effect of ``model`` (a CompiledModel with its adapter loaded from ``directory``), or a PeftcError
    naming the directory and the statement a shared base cannot stack."""
    gm, effect, tokens = model.graph_module, Effect(), {}
    for record in model.records:
        statement = model.spec.statements[record.statement]
        if record.method not in STACKABLE or isinstance(record, ExpertLoraRecord):
            what = "lora on stacked expert weights" if record.method == "lora" else record.method
            raise PeftcError(f"{directory}: '{statement}' cannot join an adapter bank: {what} changes or adds "
                             "base computation per task, which one shared base cannot stack (lora, ia3, prompt "
                             "and prefix can)")
        if record.method == "lora":
            a, b = record.factors(gm)
            effect.lora.setdefault(record.site.node, []).append((a.clone(), record.scale * b))
        elif record.method == "ia3":
            effect.ia3[record.site.node] = record.full(gm).clone()
        else:
            tokens[record.method] = record.tokens
    if len(tokens) > 1:
        raise PeftcError(f"{directory}: a bank row starts from a soft prompt's or a prefix's keys, not both")
    if tokens:
        effect.past = _constant_past(model, directory, next(iter(tokens.values())))
    return effect


def _constant_past(model, directory, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each attention's keys and values at the prompt's or prefix's P positions (every attention must have
    them: a row's cache covers every layer)."""
    gm = model.graph_module
    attentions = len(sdpa_nodes(gm.graph))
    prefixes = [r for r in model.records if isinstance(r, PrefixRecord)]
    if prefixes and len(prefixes) != attentions:
        statement = model.spec.statements[prefixes[0].statement]
        raise PeftcError(f"{directory}: '{statement}' puts a prefix on {len(prefixes)} of the model's "
                         f"{attentions} attentions; in a bank a prefix is a row's starting cache, which covers "
                         "every attention")
    found = attention_inputs(gm)
    if not found or len(found) != attentions:
        raise PeftcError(f"{directory}: the model's attentions are not scaled_dot_product_attention calls, "
                         "which a bank's cached decoder needs")
    return [(k[0, :, :tokens].float().contiguous(), v[0, :, :tokens].float().contiguous()) for k, v in found]


class StackedLora(nn.Module):
    """One site's LoRA factors for every task: A (tasks, in, r), B (tasks, r, out), r the largest rank;
    task 0 and the ranks a task lacks are zeros."""

    def __init__(self, site: LinearSite, pairs: list[list[tuple[torch.Tensor, torch.Tensor]]],
                 dtype: torch.dtype):
        super().__init__()
        ranks = [sum(a.shape[0] for a, _ in own) for own in pairs]
        a_stack = torch.zeros(len(pairs) + 1, site.in_features, max(ranks), dtype=dtype)
        b_stack = torch.zeros(len(pairs) + 1, max(ranks), site.out_features, dtype=dtype)
        for task, (own, rank) in enumerate(zip(pairs, ranks), start=1):
            if own:
                a_stack[task, :, :rank] = torch.cat([a for a, _ in own], 0).T
                b_stack[task, :rank] = torch.cat([b for _, b in own], 1).T
        self.register_buffer("lora_A", a_stack)
        self.register_buffer("lora_B", b_stack)


class StackedIa3(nn.Module):
    """One site's IA3 scales for every task: (tasks, features), task 0 and tasks without IA3 here ones."""

    def __init__(self, features: int, scales: list[torch.Tensor | None], dtype: torch.dtype):
        super().__init__()
        stack = torch.ones(len(scales) + 1, features, dtype=dtype)
        for task, own in enumerate(scales, start=1):
            if own is not None:
                stack[task] = own
        self.register_buffer("ia3_l", stack)


def stack_effects(ctx: CompileContext, effects: list[Effect], task_ids: Node, names: list[str]) -> int:
    """Insert every site's stacked branch into ``ctx.gm`` (tasks 1.. are ``effects``, named ``names``);
    returns the number of sites. Nodes are tagged with the bank and the adapters at the site."""
    count = 0
    for site in ctx.sites.linears:
        pairs = [e.lora.get(site.node, []) for e in effects]
        if any(pairs):
            _stack_lora(ctx, site, pairs, task_ids, _span(names, [bool(p) for p in pairs]))
            count += 1
    for site in ctx.sites.linears:
        scales = [e.ia3.get(site.node) for e in effects]
        if any(s is not None for s in scales):
            _stack_ia3(ctx, site, scales, task_ids, _span(names, [s is not None for s in scales]))
            count += 1
    return count


def _span(names: list[str], present: list[bool]) -> str:
    """The tag's span: the bank, and the adapters with a branch at the site."""
    return "bank:" + ",".join(n for n, here in zip(names, present) if here)


class _Emitter:
    """Graph calls that are recorded and tagged."""

    def __init__(self, graph, method: str, span: str):
        self.graph, self.nodes, self.tag = graph, [], {"pass": f"bank-{method}", "statement": None, "span": span}

    def __call__(self, target, *args) -> Node:
        node = self.graph.call_function(target, args)
        node.meta[META_KEY] = dict(self.tag)
        self.nodes.append(node)
        return node

    def attr(self, target: str) -> Node:
        node = self.graph.get_attr(target)
        node.meta[META_KEY] = dict(self.tag)
        self.nodes.append(node)
        return node

    def rows(self, x: Node, rank: int, ids: Node, features: int) -> Node:
        """``x`` as (batch, sequence, features): itself when 3-D, else its (batch · sequence, features) flattening
        (GPT-2's Conv1D) viewed with the sizes of ``ids`` (a -1 there would have torch.export divide symbols,
        which took it minutes on tiny GPT-2)."""
        if rank == 3:
            return x
        if rank != 2:
            raise PeftcError(f"a bank cannot stack an adapter on {x.name}: its features are {rank}-D")
        sizes = [self(aten.sym_size.int, ids, 0), self(aten.sym_size.int, ids, 1), features]
        return self(aten.reshape.default, x, sizes)

    def back(self, y: Node, rank: int, features: int) -> Node:
        return y if rank == 3 else self(aten.reshape.default, y, [-1, features])


def _stack_lora(ctx: CompileContext, site: LinearSite, pairs, task_ids: Node, span: str) -> None:
    graph = ctx.gm.graph
    linear = next(n for n in graph.nodes if n.name == site.node)
    base, adapter = ctx.dtypes(site.node)
    module = f"peftc_bank_lora_{sum(1 for name, _ in ctx.gm.named_children() if name.startswith('peftc_bank_lora'))}"
    ctx.add_module(module, StackedLora(site, pairs, adapter))
    source = input_of(linear, site.kind)
    x = ctx.cast(source, adapter, base)
    tip = ctx.output_of(site.node)
    emit = _Emitter(graph, "lora", span)
    with graph.inserting_before(tip.next):
        a, b = emit.attr(f"{module}.lora_A"), emit.attr(f"{module}.lora_B")
        rows = emit.rows(x, source.meta["val"].dim(), _input_ids(graph), site.in_features)
        down = emit(aten.bmm.default, rows, emit(aten.index_select.default, a, 0, task_ids))
        up = emit(aten.bmm.default, down, emit(aten.index_select.default, b, 0, task_ids))
        total = emit(aten.add.Tensor, tip, emit.back(up, linear.meta["val"].dim(), site.out_features))
        if adapter != base:     # as the lora pass sums: in the adapter's dtype, then the base's again
            total = emit(aten._to_copy.default, total)
            total.kwargs = {"dtype": base}
    ctx.replace_output(site.node, total, emit.nodes)


def _stack_ia3(ctx: CompileContext, site: LinearSite, scales, task_ids: Node, span: str) -> None:
    graph = ctx.gm.graph
    linear = next(n for n in graph.nodes if n.name == site.node)
    feedforward = site.role == "down"          # as the ia3 pass: a down projection's input is scaled
    features = site.in_features if feedforward else site.out_features
    base, adapter = ctx.dtypes(site.node)
    module = f"peftc_bank_ia3_{sum(1 for name, _ in ctx.gm.named_children() if name.startswith('peftc_bank_ia3'))}"
    ctx.add_module(module, StackedIa3(features, scales, adapter))
    anchor = input_of(linear, site.kind) if feedforward else ctx.output_of(site.node)
    rank = (anchor if feedforward else linear).meta["val"].dim()
    emit = _Emitter(graph, "ia3", span)
    with graph.inserting_before(linear if feedforward else anchor.next):
        table = emit.attr(f"{module}.ia3_l")
        own = emit(aten.unsqueeze.default, emit(aten.index_select.default, table, 0, task_ids), 1)
        source = anchor
        if adapter != base:
            source = emit(aten._to_copy.default, anchor)
            source.kwargs = {"dtype": adapter}
        scaled = emit.back(emit(aten.mul.Tensor, emit.rows(source, rank, _input_ids(graph), features), own), rank, features)
        if adapter != base:
            scaled = emit(aten._to_copy.default, scaled)
            scaled.kwargs = {"dtype": base}
    if feedforward:
        linear.replace_input_with(anchor, scaled)
    else:
        ctx.replace_output(site.node, scaled, emit.nodes)


def _input_ids(graph) -> Node:
    return next(n for n in graph.nodes if n.op == "placeholder")
