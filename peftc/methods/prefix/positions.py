"""The prefix pass's shift of the model's position ids by P (see :mod:`peftc.methods.prefix.rewrite`): the
integer position tensors that reach an attention's query, key or value (an ``arange`` over the sequence, a
``cumsum`` of the attention mask, a slice of a position-id buffer) get P added on that path only."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.methods.prefix.attention import Emit, attention_calls

aten = torch.ops.aten
ARANGE_OPS = {aten.arange.default, aten.arange.start, aten.arange.start_step}
INT_DTYPES = {torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}


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


def _is_int(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype in INT_DTYPES


def position_roots(gm: GraphModule) -> list[Node]:
    """The integer position tensors of the sequence that feed the attention's inputs (see the module doc)."""
    on_path = _value_path(gm)
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
    return [r for r in roots if not any(a in root_set for a in _ancestors(r))]


def _ancestors(node: Node) -> set[Node]:
    seen, frontier = set(), list(node.all_input_nodes)
    while frontier:
        n = frontier.pop()
        if n not in seen:
            seen.add(n)
            frontier.extend(n.all_input_nodes)
    return seen


def _is_arange_buffer(gm: GraphModule, node) -> bool:
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return False
    try:
        value = gm.get_buffer(node.target)
    except AttributeError:
        return False
    return value.dtype in INT_DTYPES and torch.equal(value.flatten(), torch.arange(value.numel()))


def shift_positions(emit: Emit, tokens: int) -> list[str]:
    """Add ``tokens`` to the position ids on the path to the attention inputs; returns the roots shifted."""
    gm = emit.ctx.gm
    on_path = _value_path(gm)
    shifted = []
    for root in position_roots(gm):
        users = [u for u in root.users if u in on_path]
        if not users:
            continue
        with emit.graph.inserting_after(root):
            moved = emit(aten.add.Tensor, root, tokens)
        for user in users:
            user.replace_input_with(root, moved)
        shifted.append(root.name)
    return shifted
