"""The precision of an exported file: every export computes in float32, and stores its weights in float32 (the
``fp32`` target) or float16 (``fp16``: half the file), whatever dtype the torch model holds them in.

A model compiled on a bfloat16 or float16 base keeps its weights in that dtype; exporting it never makes a
float32 copy of the model. Instead :func:`float32_compute` gives a view of the model (sharing every weight)
whose graph casts each weight to the stored dtype and then to float32 where it is read, and computes in
float32 throughout: it is the torch model the ONNX file is verified against. Its capture has these casts
after each weight initializer; :func:`fold_weight_casts` folds them into the initializers, as tensors
computed only when the file is written (one at a time, streamed to the external-data file), so the file
holds float32 (or float16) weights and the model's memory is not held twice.

An ``fp16`` file keeps one ``Cast`` to float32 after each float16 initializer: ONNX Runtime folds it when it
loads the model and computes in float32, so the CPU provider needs no float16 kernels."""
from __future__ import annotations

import functools
import operator
from itertools import chain

import torch
from torch.utils._pytree import tree_map

from peftc.compiler.compiled import CompiledModel
from peftc.graph.capture import copy_graph_module

#: weights with fewer elements (norm scales, small constants) are stored in float32 in an ``fp16`` file
MIN_ELEMENTS = 1024
STORED = {"fp32": torch.float32, "fp16": torch.float16}
_HALF = (torch.bfloat16, torch.float16)


def _stored_dtype(tensor: torch.Tensor, stored: torch.dtype) -> torch.dtype:
    return stored if tensor.numel() >= MIN_ELEMENTS else torch.float32


def needs_view(gm: torch.fx.GraphModule, stored: torch.dtype) -> bool:
    """Whether ``gm``'s weights are not already float32 weights computed in float32."""
    weights = [t for t in chain(gm.parameters(), gm.buffers()) if t.is_floating_point()]
    return any(t.dtype in _HALF or _stored_dtype(t, stored) != torch.float32 for t in weights)


def float32_compute(model, stored: torch.dtype = torch.float32):
    """``model`` (a CompiledModel) as a model computing in float32 from its weights rounded to ``stored``,
    sharing its weight tensors; ``model`` itself when it already is one."""
    gm = getattr(model, "graph_module", None)
    if (not isinstance(model, CompiledModel) or gm is None or getattr(model, "stored_dtype", None) == stored
            or not needs_view(gm, stored)):
        return model
    view = copy_graph_module(gm)
    graph = view.graph
    for node in list(graph.nodes):        # the casts inserted below are not in this list
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(view)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                _cast_where_read(graph, node, value.dtype, _stored_dtype(value, stored))
        elif node.op == "call_function":
            node.args, node.kwargs = tree_map(_to_float32, (node.args, node.kwargs))
    graph.lint()
    view.recompile()
    out = CompiledModel(view, spec=model.spec, sites=model.sites, records=list(model.records), kind=model.kind,
                        config=model.config, model_ref=model.model_ref, signature=model.signature)
    out.base_dtype, out.stored_dtype = torch.float32, stored
    return out


def _cast_where_read(graph: torch.fx.Graph, node: torch.fx.Node, dtype: torch.dtype, stored: torch.dtype) -> None:
    """Every use of the weight ``node`` (of ``dtype``) reads it rounded to ``stored``, in float32, cast just
    before the use: one weight's float32 copy is alive at a time, not the whole model's."""
    casts = ([stored] if stored != dtype else []) + ([torch.float32] if stored != torch.float32 else [])
    if not casts:
        return
    for user in list(node.users):
        last = node
        for target in casts:
            with graph.inserting_before(user):
                last = graph.call_function(torch.ops.aten._to_copy.default, (last,), {"dtype": target})
        user.replace_input_with(node, last)


def _to_float32(value):
    return torch.float32 if value in _HALF else value


def fold_weight_casts(model) -> int:
    """In an ONNX IR ``model`` (onnx_ir), fold the cast that reads each weight initializer in its stored dtype
    into the initializer: a bfloat16 initializer read through ``Cast`` becomes a float32 (or float16) one, a
    float32 initializer read through ``Cast`` to float16 a float16 one. The new initializers are computed from
    the old ones when the file is written. Returns how many casts were folded."""
    import onnx_ir as ir
    folded = 0
    for value in list(model.graph.initializers.values()):
        while True:
            uses = list(value.uses())
            if len(uses) != 1 or value.is_graph_output() or value.const_value is None:
                break
            cast = uses[0].node
            if cast.op_type != "Cast" or cast.domain not in ("", "ai.onnx"):
                break
            source, target = value.const_value.dtype, ir.DataType(cast.attributes["to"].as_int())
            if not (source == ir.DataType.BFLOAT16 and target in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
                    or source == ir.DataType.FLOAT and target == ir.DataType.FLOAT16):
                break
            value.const_value = ir.LazyTensor(functools.partial(_converted, value.const_value, target),
                                              dtype=target, shape=value.const_value.shape, name=value.name)
            value.dtype = target
            ir.convenience.replace_all_uses_with(cast.outputs[0], value)
            cast.graph.remove(cast, safe=True)
            folded += 1
    return folded


def keeps_weight_casts(node) -> bool | None:
    """For onnxscript's constant folding, which runs first: leave the casts that read weight initializers to
    :func:`fold_weight_casts` (folding them would make the stored dtype float32 again, and hold the
    converted weights in memory); no opinion on any other node."""
    import onnx_ir as ir
    source = node.inputs[0] if node.op_type == "Cast" and node.inputs else None
    if (source is not None and source.is_initializer()
            and source.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)):
        return False
    return None


def _converted(tensor, target):
    """``tensor`` (an onnx_ir tensor) converted to the ONNX dtype ``target``."""
    import onnx_ir as ir
    raw = getattr(tensor, "raw", None)
    dtype = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16}[target]
    if isinstance(raw, torch.Tensor):
        return ir.Tensor(raw.detach().to(dtype).numpy(), name=tensor.name)
    return ir.Tensor(tensor.numpy().astype(target.numpy()), name=tensor.name)
