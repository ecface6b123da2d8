"""The prefix pass's shift of the model's position ids by P (see :mod:`peftc.methods.prefix.rewrite`): the
integer position tensors that reach an attention's query, key or value (an ``arange`` over the sequence, a
``cumsum`` of the attention mask, a slice of a position-id buffer) get P added on that path only.

Position ids are told by what they feed, not by how they are made: a rotary embedding's ``cos``/``sin``, or
an index into a table the model holds (a position embedding, a sin/cos table as GPT-J's) — a lookup whose
table no input reaches. Any other integer ``arange`` on the way to an attention is something else: a
mixture-of-experts block numbers its tokens with one to scatter the experts' outputs back, and shifting that
indexed out of bounds."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.methods.prefix.attention import Emit, attention_calls
from peftc.methods.prefix.dataflow import downstream, upstream

aten = torch.ops.aten
ARANGE_OPS = {aten.arange.default, aten.arange.start, aten.arange.start_step}
INT_DTYPES = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}
TRIG_OPS = {aten.cos.default, aten.sin.default, aten.polar.default}   # a rotary embedding (complex: polar)
LOOKUP_OPS = {aten.embedding.default, aten.index.Tensor, aten.index_select.default, aten.gather.default}


def _value_path(gm: GraphModule) -> set[Node]:
    """Nodes that reach some attention's query, key or value (not only its mask)."""
    inputs = {call.node: [call.query, call.key, call.value] for call in attention_calls(gm)}
    out: set[Node] = set()
    frontier = [a for qkv in inputs.values() for a in qkv if isinstance(a, Node)]
    while frontier:
        node = frontier.pop()
        if node in out:
            continue
        out.add(node)
        if node in inputs:
            frontier += [a for a in inputs[node] if isinstance(a, Node)]
        else:
            frontier += node.all_input_nodes
    return out


def _from_inputs(gm: GraphModule) -> set[Node]:
    """Nodes computed from some input of the graph (the rest are the model's constants)."""
    return downstream(gm.graph, (n for n in gm.graph.nodes if n.op == "placeholder"))


def _position_uses(gm: GraphModule) -> list[Node]:
    """What position ids become: a ``cos``/``sin`` (or a complex ``polar``), or a lookup in a constant table."""
    varying = _from_inputs(gm)
    return [node for node in gm.graph.nodes if node.op == "call_function" and (
        node.target in TRIG_OPS or (node.target in LOOKUP_OPS and node.args[0] not in varying))]


def _position_path(gm: GraphModule) -> set[Node]:
    """Nodes on the way to the attention's inputs that feed a position use (see the module doc), the uses
    included."""
    return upstream(_position_uses(gm)) & _value_path(gm)


def _is_int(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype in INT_DTYPES


def position_roots(gm: GraphModule) -> list[Node]:
    """The integer position tensors of the sequence that feed the attention's inputs (see the module doc)."""
    on_path = _position_path(gm)
    roots = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in on_path or not _is_int(node):
            continue
        if node.target in ARANGE_OPS or node.target is aten.cumsum.default:
            roots.append(node)
        elif node.target is aten.slice.Tensor and _is_arange_buffer(gm, node.args[0]):
            roots.append(node)
    # keep the outermost: a root computed from another root is shifted through it
    root_set = set(roots)
    return [r for r in roots if not any(a in root_set for a in upstream(r.all_input_nodes))]


def _is_arange_buffer(gm: GraphModule, node) -> bool:
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return False
    try:
        value = gm.get_buffer(node.target)
    except AttributeError:
        return False
    return value.dtype in INT_DTYPES and torch.equal(value.flatten(), torch.arange(value.numel()))


def shift_positions(emit: Emit, tokens: int, within: set[Node] | None = None) -> list[str]:
    """Add ``tokens`` to the position ids on the path to the attention inputs (only those of ``within``,
    an encoder-decoder's decoder, where given); returns the roots shifted."""
    gm = emit.ctx.gm
    on_path = _position_path(gm)
    shifted = []
    for root in position_roots(gm):
        if within is not None and root not in within:
            continue
        users = [u for u in root.users if u in on_path]
        if not users:
            continue
        with emit.graph.inserting_after(root):
            moved = emit(aten.add.Tensor, root, tokens)
        for user in users:
            user.replace_input_with(root, moved)
        shifted.append(root.name)
    return shifted
