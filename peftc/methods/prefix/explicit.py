"""Attention spelt out in aten ops, for the prefix pass: ``matmul(softmax(f(q · kᵀ) + mask), v)`` as
transformers' ``eager_attention_forward`` computes it (Gemma2's default, any model run with
``attn_implementation="eager"``), found from each softmax (:func:`explicit_attention`).

Between the scores ``matmul(q, transpose(k))`` and the softmax only ops that act on each score alone may
come (a scale, Gemma2's ``tanh`` soft cap, a dtype cast) and at most one added mask that reads neither q
nor k; between the softmax and ``matmul(·, v)`` only casts and dropout. Then prefix keys and values may be
concatenated to k and v, and mask columns to the mask, exactly as for an SDPA call. Anything else (Bloom's
``baddbmm`` with ALiBi, DeBERTa's relative-position scores added from q and k) is not matched, and the pass
says so."""
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
    or a spelt-out attention, whose ``node`` is ``matmul(probabilities, v)``."""
    node: Node
    query: Node
    key: Node
    value: Node
    mask: Node | None
    causal: bool = False
    scores: Node | None = None        # matmul(q, kᵀ)
    mask_add: Node | None = None      # the add of the mask to the scores

    @property
    def first(self) -> Node:
        """The node before which the prefixes and the extended mask must exist."""
        return self.scores if self.scores is not None else self.node


def explicit_attention(softmax: Node) -> AttentionCall | None:
    """The spelt-out attention around ``softmax`` (see the module doc), or None when it is not one."""
    if softmax.args[1] not in (-1, 3):
        return None
    output = _only_user(softmax)
    while output is not None and output.target in PROBABILITY_OPS:
        output = _only_user(output)
    if output is None or output.target is not aten.matmul.default:
        return None
    node, mask_add, mask = softmax.args[0], None, None
    while isinstance(node, Node) and node.target is not aten.matmul.default:
        if node.target is aten.add.Tensor and mask_add is None and all(isinstance(a, Node) for a in node.args):
            mask_add, (node, mask) = node, node.args
        elif node.target in SCORE_OPS and not any(isinstance(a, Node) for a in node.args[1:]):
            node = node.args[0]
        else:
            return None
    if not isinstance(node, Node) or not _is_key_transpose(node.args[1]):
        return None
    query, key, value = node.args[0], node.args[1].args[0], output.args[1]
    if mask is not None and _reads(mask, {query, key}):
        return None
    return AttentionCall(output, query, key, value, mask, scores=node, mask_add=mask_add)


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


def _is_key_transpose(node) -> bool:
    if not isinstance(node, Node) or node.target is not aten.transpose.int:
        return False
    val = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if val is not None and (not isinstance(val, torch.Tensor) or val.dim() != 4):
        return False          # (a prefix pass's concatenation has no recorded value)
    return {d % 4 for d in node.args[1:]} == {2, 3}


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
