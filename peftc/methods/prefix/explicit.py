"""Attention spelt out in aten ops, for the prefix pass: ``matmul(softmax(f(q · kᵀ) + mask), v)`` as
transformers' ``eager_attention_forward`` computes it (Gemma2's default, any model run with
``attn_implementation="eager"``), and Bloom's ``bmm(softmax(baddbmm(alibi, q, kᵀ) + mask), v)`` over
batch·heads, found from each softmax (:func:`explicit_attention`).

Between the scores and the softmax only ops that act on each score alone may come (a scale, Gemma2's
``tanh`` soft cap, a cast, a view) and at most one added mask that reads neither q nor k; between the
softmax and the product with v only casts, dropout and views. Bloom's bias must be one row per key (ALiBi:
batch·heads × 1 × keys), computed from the attention-mask input alone. Then prefix keys and values may be
concatenated to k and v, and columns to the mask and the bias, as for an SDPA call. Anything else
(DeBERTa-v2's relative-position scores, added from q and k) is not matched, and the pass says so."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

aten = torch.ops.aten
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default}
#: after the softmax, before ``matmul(·, v)``
PROBABILITY_OPS = {aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.type_as.default}
#: read only their input's shape, dtype and device
SHAPE_OPS = {aten.sym_size.int, aten.new_ones.default, aten.new_zeros.default, aten.new_full.default}
RESHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
#: on each score alone: (op, index of its tensor argument); scalars only beside it
SCORE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.tanh.default, aten.to.dtype, aten._to_copy.default,
             aten.mul.Scalar, aten.div.Scalar}


@dataclass
class AttentionCall:
    """What :func:`peftc.methods.prefix.attention.extend_attention` rewrites: an SDPA call (``scores`` None)
    or a spelt-out attention, whose ``node`` computes probabilities · v. ``key`` and ``value`` are
    (batch, heads, T, head_dim) either way; a spelt-out attention reads them in ``key_reader`` and
    ``value_reader`` (a transpose, a matmul, or Bloom's reshapes to batch·heads)."""
    node: Node
    query: Node
    key: Node
    value: Node
    mask: Node | None
    causal: bool = False
    scores: Node | None = None        # matmul(q, kᵀ), or baddbmm(bias, q, kᵀ)
    mask_add: Node | None = None      # the add of the mask to the scores
    key_reader: Node | None = None
    value_reader: Node | None = None
    bias: Node | None = None          # baddbmm's per-key bias (Bloom's ALiBi), computed from the mask input

    @property
    def first(self) -> Node:
        """The node before which the prefixes must exist: the SDPA call, or the first reader of k or v."""
        if self.scores is None:
            return self.node
        for node in self.node.graph.nodes:
            if node is self.key_reader or node is self.value_reader:
                return node
        return self.node


def explicit_attention(softmax: Node) -> AttentionCall | None:
    """The spelt-out attention around ``softmax`` (see the module doc), or None when it is not one."""
    if softmax.args[1] not in (-1, 3):
        return None
    output = _only_user(softmax)
    while output is not None and output.target in PROBABILITY_OPS | RESHAPE_OPS:
        output = _only_user(output)
    values = _values(output)
    node, mask_add, mask = softmax.args[0], None, None
    while isinstance(node, Node) and node.target not in (aten.matmul.default, aten.baddbmm.default):
        if node.target is aten.add.Tensor and mask_add is None and all(isinstance(a, Node) for a in node.args):
            mask_add, (node, mask) = node, node.args
        elif node.target in SCORE_OPS | RESHAPE_OPS and not any(isinstance(a, Node) for a in node.args[1:]):
            node = node.args[0]
        else:
            return None
    keys = _keys(node) if isinstance(node, Node) else None
    if values is None or keys is None:
        return None
    bias = node.args[0] if node.target is aten.baddbmm.default else None
    query = node.args[1] if bias is not None else node.args[0]
    if any(t is not None and _reads(t, {query, keys[1]}) for t in (mask, bias)):
        return None
    if bias is not None and not _per_key(bias):
        return None
    return AttentionCall(output, query, keys[1], values[1], mask, scores=node, mask_add=mask_add,
                         key_reader=keys[0], value_reader=values[0], bias=bias)


def _values(output: Node | None) -> tuple[Node, Node] | None:
    """(reader, v) of ``matmul(probabilities, v)``, or of Bloom's ``bmm(probabilities, reshape(v))``."""
    if output is None or not isinstance(output.args[1], Node):
        return None
    if output.target is aten.matmul.default:
        return output, output.args[1]
    if output.target is aten.bmm.default and _merges_heads(output.args[1]):
        return output.args[1], output.args[1].args[0]
    return None


def _keys(scores: Node) -> tuple[Node, Node] | None:
    """(reader, k): ``transpose(k)`` of ``matmul(q, kᵀ)``, or Bloom's ``reshape(k)`` in
    ``baddbmm(bias, q, transpose(reshape(k)))``."""
    transposed = scores.args[1] if scores.target is aten.matmul.default else scores.args[2]
    if not isinstance(transposed, Node) or transposed.target is not aten.transpose.int:
        return None
    inner = transposed.args[0]
    if scores.target is aten.matmul.default:
        return (transposed, inner) if _dims(inner) in (4, None) and _last_two(transposed, 4) else None
    if _merges_heads(inner) and _last_two(transposed, 3):
        return inner, inner.args[0]
    return None


def _merges_heads(node) -> bool:
    """``reshape(x, [batch·heads, -1, head_dim])`` of a 4-D x: the sequence length stays free."""
    return (isinstance(node, Node) and node.target in RESHAPE_OPS and isinstance(node.args[0], Node)
            and _dims(node.args[0]) in (4, None) and len(node.args[1]) == 3 and node.args[1][1] == -1)


def _dims(node: Node) -> int | None:
    """The node's rank, or None for one a pass inserted (no recorded value)."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _last_two(transpose: Node, rank: int) -> bool:
    return {d % rank for d in transpose.args[1:]} == {rank - 2, rank - 1}


def _per_key(bias: Node) -> bool:
    """A bias of one row for every query (batch·heads, 1, keys), as ALiBi's is."""
    val = bias.meta.get("val")
    return val is None or (isinstance(val, torch.Tensor) and val.dim() == 3 and val.shape[1] == 1)


def weighs_values(softmax: Node) -> bool:
    """Whether the softmax's probabilities are multiplied into something (through casts, dropout and
    reshapes): an attention's, matched by :func:`explicit_attention` or not (a router's go to a top-k)."""
    node = _only_user(softmax)
    while node is not None and node.target in PROBABILITY_OPS | RESHAPE_OPS:
        node = _only_user(node)
    return node is not None and node.target in (aten.matmul.default, aten.bmm.default)


def _only_user(node: Node) -> Node | None:
    users = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
    return users[0] if len(users) == 1 else None


def _reads(node: Node, targets: set[Node]) -> bool:
    """Whether ``node`` is computed from the values of any of ``targets`` (not only from their shapes)."""
    seen, frontier = set(), [node]
    while frontier:
        n = frontier.pop()
        if n in targets:
            return True
        if n not in seen and n.target not in SHAPE_OPS:
            seen.add(n)
            frontier.extend(n.all_input_nodes)
    return False
