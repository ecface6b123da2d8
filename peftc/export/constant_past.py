"""A soft prompt as a constant past, for the KV-cache decoder (:mod:`peftc.export.kvcache`).

The prompt pass runs the model on ``[prompt; input]``. In a causal model the prompt's P positions attend
only to each other, so their keys and values in every attention are the same whatever follows: they are a
prefix, computed once. :func:`prompt_as_past` computes them by running the merged graph on a short input and
reading each attention's keys and values at the first P positions, undoes the prompt pass's rewrite (the
padded inputs, the prompt's rows, the dropped output positions), and inserts the keys and values as the
prefix pass inserts its own (:func:`peftc.methods.prefix.attention.extend_attention`, with the positions
shifted by P). The decoder then never re-runs the prompt, and a step costs what it costs without one."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg

from peftc.errors import ExportError
from peftc.graph.analysis import ATTENTION_OPS
from peftc.graph.capture import copy_graph_module
from peftc.methods.prefix.attention import Emit, attention_call, extend_attention, sdpa_args
from peftc.methods.prefix.positions import shift_positions
from peftc.methods.prefix.rewrite import PrefixWeights
from peftc.methods.prefix.window import attention_windows

aten = torch.ops.aten


@dataclass
class ConstantPrefix:
    """What the KV-cache rewrite needs to know of a prefix it keeps in front of the past."""
    nodes: list[str] = field(default_factory=list)


class _Context:
    """The little of a CompileContext that :class:`Emit` uses."""

    def __init__(self, gm: GraphModule):
        self.gm = gm

    def tag(self, node: Node, *_args) -> Node:
        return node


class _Keys(Interpreter):
    """Runs a graph and keeps the keys and values each attention receives."""

    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.found: list[tuple[torch.Tensor, torch.Tensor]] = []

    def run_node(self, n: Node):
        if n.op == "call_function" and n.target in ATTENTION_OPS:
            a = sdpa_args(n)
            self.found.append((self.env[a["key"]], self.env[a["value"]]))
        return super().run_node(n)


def attention_inputs(gm: GraphModule, tokens: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values every attention of ``gm`` receives, in graph order, on ``tokens`` zero ids (one
    row): a prefix's or a soft prompt's P positions come first in each and do not depend on what follows."""
    ids = torch.zeros(1, tokens, dtype=torch.long)
    with torch.no_grad():
        keys = _Keys(gm)
        keys.run(ids, torch.ones_like(ids))
    return keys.found


def sdpa_nodes(graph: torch.fx.Graph) -> list[Node]:
    """The graph's scaled_dot_product_attention calls, in order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]


def graph_windows(gm: GraphModule, config) -> dict[str, int]:
    """{SDPA node: its sliding window} of ``gm``'s attentions (those whose mask slides)."""
    return attention_windows(gm, config, [attention_call(n) for n in sdpa_nodes(gm.graph)],
                             lambda target: operator.attrgetter(target)(gm))


def prompt_as_past(model) -> tuple[GraphModule, dict[str, ConstantPrefix], dict[str, int]]:
    """(a copy of ``model``'s graph with its soft prompt as constant prefixes, {SDPA node: its prefix},
    {SDPA node: its sliding window}). Under a window the prompt's positions drop out of it as a prefix's
    do."""
    records = [r for r in model.records if r.method == "prompt"]
    if any(r.method == "prefix" for r in model.records):
        raise ExportError("a KV-cache decoder takes a soft prompt or a prefix, not both")
    record = records[0]
    gm = copy_graph_module(model.graph_module)
    tokens = record.tokens
    found = attention_inputs(gm)
    _unprompt(gm, record)
    sdpas = sdpa_nodes(gm.graph)
    if len(sdpas) != len(found):
        raise ExportError("the soft prompt's keys and values do not match the model's attentions")
    windows = graph_windows(gm, model.config)
    emit = Emit(_Context(gm), None, 0, "prompt")
    prefixes = {}
    for i, (sdpa, (key, value)) in enumerate(zip(sdpas, found)):
        name = f"peftc_prompt_past_{i}"
        weights = PrefixWeights(0, 0, 0, empty=True)
        weights.key = nn.Parameter(key[0, :, :tokens].contiguous(), requires_grad=False)
        weights.value = nn.Parameter(value[0, :, :tokens].contiguous(), requires_grad=False)
        gm.add_submodule(name, weights)
        start = len(emit.nodes)
        with gm.graph.inserting_before(sdpa):
            pair = emit.attr(f"{name}.key"), emit.attr(f"{name}.value")
        q, k = sdpa_args(sdpa)["query"], sdpa_args(sdpa)["key"]
        extend_attention(emit, sdpa, *pair, tokens, int(q.meta["val"].shape[1]), int(k.meta["val"].shape[1]),
                         k.meta["val"].dtype, window=windows.get(sdpa.name))
        prefixes[sdpa.name] = ConstantPrefix([n.name for n in emit.nodes[start:]])
    start = len(emit.nodes)
    shift_positions(emit, tokens)
    for prefix in prefixes.values():
        prefix.nodes += [n.name for n in emit.nodes[start:]]
    gm.graph.lint()
    gm.recompile()
    return gm, prefixes, windows


def _unprompt(gm: GraphModule, record) -> None:
    """Undo the prompt pass: inputs unpadded, the embedding's own rows, every output position kept."""
    graph = gm.graph
    inserted = {n for n in graph.nodes if n.name in set(record.nodes)}
    for node in inserted:
        if node.target is not aten.cat.default:
            continue
        last = node.args[0][-1]
        if last.op == "placeholder":                          # the padded input_ids / attention_mask
            node.replace_all_uses_with(last, delete_user_cb=lambda u: u not in inserted)
        elif last in inserted and last.target is aten.slice.Tensor:     # [prompt rows; embedding rows P:]
            node.replace_all_uses_with(last.args[0])
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = map_arg(output.args, lambda a: a.args[0] if a in inserted else a)
    graph.eliminate_dead_code()
    gm.delete_submodule(record.module)
