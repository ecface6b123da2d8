"""Captured aten ops that torch's ONNX functions do not implement, rewritten into ones they do before the
direct conversion (:func:`peftc.export.onnx._convert`), and the test of what remains uncovered."""
from __future__ import annotations

import operator

import torch


def uncovered(gm, implemented) -> set[str]:
    """The call targets in ``gm`` that no registered ONNX function implements, or that write to their
    inputs (ONNX values are immutable; the full route functionalises those)."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem
            and (n.target not in implemented or getattr(getattr(n.target, "_schema", None), "is_mutable", False))}


def lower(graph: torch.fx.Graph) -> None:
    """Replace the captured ops torch's ONNX functions do not implement by ones they do: dtype/device
    conversions become ``_to_copy`` to the dtype (or nothing), ``alias`` nothing, ``new_ones`` ``ones``,
    ``&`` on tensors ``bitwise_and``, ``view`` ``reshape``, ``min(a, b)`` ``minimum``, in-place ``add_``
    ``add``; and ``x * rsqrt(v)`` becomes ``x / sqrt(v)``, the form in which ONNX Runtime fuses an RMS norm
    into one ``SimplifiedLayerNormalization`` kernel (seven ops a norm otherwise: on SmolLM2, 61 norms, a
    sixth of a decoder step's nodes). Values (``meta['val']``) are unchanged, so nothing downstream moves."""
    aten = torch.ops.aten
    conversions = (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other, aten.alias.default)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target = node.target
        if target in conversions:
            source, val = node.args[0], node.meta.get("val")
            if not isinstance(val, torch.Tensor) or not isinstance(source.meta.get("val"), torch.Tensor):
                continue
            if source.meta["val"].dtype == val.dtype:
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                continue
            _replace(graph, node, aten._to_copy.default, (source,), {"dtype": val.dtype})
        elif target is aten.new_ones.default and isinstance(node.meta.get("val"), torch.Tensor):
            _replace(graph, node, aten.ones.default, (node.args[1],), {"dtype": node.meta["val"].dtype})
        elif target is aten.__and__.Tensor:
            node.target = aten.bitwise_and.Tensor
        elif target is aten.view.default:   # both are ONNX Reshape; a view the capture proved for its example
            node.target = aten.reshape.default      # strides (T5's transposed attention output) fails re-tracing
        elif target is aten.min.other:
            node.target = aten.minimum.default
        elif target is aten.add_.Tensor:
            _functional_add(graph, node)
        elif target is aten.rsqrt.default:
            _divide_by_root(graph, node)


def _functional_add(graph: torch.fx.Graph, node) -> None:
    """``x.add_(y)`` (T5's relative position buckets) as ``add(x, y)``, read by whatever read ``x`` after it."""
    source = node.args[0]
    order = {n: i for i, n in enumerate(graph.nodes)}
    later = [user for user in source.users if order[user] > order[node]]
    new = _replace(graph, node, torch.ops.aten.add.Tensor, node.args, node.kwargs)
    for user in later:
        user.replace_input_with(source, new)


def _divide_by_root(graph: torch.fx.Graph, rsqrt) -> None:
    """Every ``mul(x, rsqrt(v))`` (either order) as ``div(x, sqrt(v))``, when each user of the rsqrt is such a
    multiplication of two tensors of one dtype."""
    aten = torch.ops.aten
    users = list(rsqrt.users)
    if not users or any(u.target is not aten.mul.Tensor or len(u.args) != 2 or u.kwargs
                        or not all(isinstance(a, torch.fx.Node) for a in u.args) for u in users):
        return
    dtypes = {getattr(a.meta.get("val"), "dtype", None) for u in users for a in u.args}
    if len(dtypes) != 1 or None in dtypes:
        return
    with graph.inserting_before(rsqrt):
        root = graph.call_function(aten.sqrt.default, rsqrt.args)
    root.meta = dict(rsqrt.meta)
    for user in users:
        other = user.args[1] if user.args[0] is rsqrt else user.args[0]
        _replace(graph, user, aten.div.Tensor, (other, root), {})
    graph.erase_node(rsqrt)


def _replace(graph: torch.fx.Graph, node, target, args, kwargs) -> torch.fx.Node:
    with graph.inserting_before(node):
        new = graph.call_function(target, args, kwargs)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new
