"""The ONNX lowerings of the custom ops a graph holds: peftc's quantized ops (:mod:`peftc.quant.ops`), NF4 to
ONNX Runtime's ``com.microsoft.MatMulBnb4``, int4 to ``com.microsoft.MatMulNBits``, int8 to a dequantizing
``MatMul``; and transformers' grouped expert matmul (``transformers.grouped_mm_fallback``, what a
mixture-of-experts block's stacked experts run as), one ``MatMul`` per expert over its rows.
``translation_table()`` is the ``custom_translation_table`` of ``torch.onnx.export`` and of the direct
conversion."""
from __future__ import annotations

import functools

import torch

from peftc.export.attention_onnx import lower_sdpa
from peftc.quant import nf4
from peftc.quant.int8 import INV_127
from peftc.quant.ops import LAYOUTS, SCHEMES, op, parse_op, split_args
from peftc.quant.scheme import Scheme


def _opsets():
    import onnxscript
    return onnxscript.opset18, _MicrosoftOps()


class _MicrosoftOps:
    """The two ``com.microsoft`` contrib ops used here. The ``onnx`` package has no schemas for contrib ops,
    and onnxscript needs one to build a node, so they are declared here as ONNX Runtime documents them."""

    def __getattr__(self, name: str):
        return _contrib_op(name)


@functools.cache
def _contrib_op(name: str):
    import onnxscript
    from onnx.defs import OpSchema
    floats = ["tensor(float)", "tensor(float16)"]
    formal = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attr = OpSchema.Attribute
    if name == "MatMulBnb4":
        inputs = [formal("A", "T1"), formal("B", "T2"), formal("absmax", "T1")]
        attributes = [attr("K", OpSchema.AttrType.INT, "", required=True),
                      attr("N", OpSchema.AttrType.INT, "", required=True),
                      attr("block_size", OpSchema.AttrType.INT, "", required=True),
                      attr("quant_type", OpSchema.AttrType.INT, "", required=True)]
        types = [("T1", floats, ""), ("T2", ["tensor(uint8)"], "")]
    elif name == "MatMulNBits":
        inputs = [formal("A", "T1"), formal("B", "T2"), formal("scales", "T1"),
                  formal("zero_points", "T3", param_option=optional)]
        attributes = [attr("K", OpSchema.AttrType.INT, "", required=True),
                      attr("N", OpSchema.AttrType.INT, "", required=True),
                      attr("bits", OpSchema.AttrType.INT, "", required=True),
                      attr("block_size", OpSchema.AttrType.INT, "", required=True)]
        types = [("T1", floats, ""), ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)"] + floats, "")]
    else:
        raise AttributeError(name)
    schema = OpSchema(name, "com.microsoft", 1, inputs=inputs, outputs=[formal("Y", "T1")],
                      type_constraints=types, attributes=attributes)
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), name, schema)


def _const(op, array):
    import onnx
    import numpy as np
    return op.Constant(value=onnx.numpy_helper.from_array(np.asarray(array)))


def _lower_nf4(x, tensors, params):
    op, msft = _opsets()
    packed, absmax, scale, offset = tensors
    (out_f, in_f), block = params
    if scale is not None:   # undo the double quantization: code8[q] · absmax2 per 256, + offset
        n_blocks = -(-out_f * in_f // block)
        group = nf4.DOUBLE_QUANT_BLOCK
        padded = -(-n_blocks // group) * group
        values = op.Gather(_const(op, nf4.dynamic_map().numpy()), op.Cast(absmax, to=7))
        values = op.Pad(values, _const(op, [0, padded - n_blocks]))
        values = op.Mul(op.Reshape(values, _const(op, [-1, group])), op.Unsqueeze(scale, _const(op, [1])))
        values = op.Slice(op.Reshape(values, _const(op, [-1])), _const(op, [0]), _const(op, [n_blocks]))
        absmax = op.Add(values, offset)
    return msft.MatMulBnb4(x, packed, absmax, K=in_f, N=out_f, block_size=block, quant_type=1)


def _lower_int8(x, tensors, params):
    import numpy as np
    op, _ = _opsets()
    qweight, absmax = tensors
    weight = op.Mul(op.Mul(op.Cast(qweight, to=1), op.Unsqueeze(absmax, _const(op, [1]))),
                    _const(op, np.float32(INV_127)))
    return op.MatMul(x, op.Transpose(weight, perm=[1, 0]))


def _lower_int4(x, tensors, params):
    _, msft = _opsets()
    packed, scales, zero_points = tensors
    (out_f, in_f), block = params
    return msft.MatMulNBits(x, packed, scales, zero_points, K=in_f, N=out_f, bits=4, block_size=block)


#: each scheme's lowering: (x, weight values, params) -> y without bias
LOWER = {"nf4": _lower_nf4, "int8": _lower_int8, "int4": _lower_int4}


def _lowering(scheme: Scheme, layout: str):
    def lower(*args):
        x, tensors, bias, params = split_args(scheme, layout, args)
        y = LOWER[scheme.name](x, tensors, params)
        if bias is not None:
            y = _opsets()[0].Add(y, bias)
        return y
    lower.__name__ = f"peftc_{scheme.name}_{layout}"
    return lower


#: block sizes ONNX Runtime's MatMulBnb4 CPU kernel runs
MATMULBNB4_BLOCKS = (16, 32, 64, 128, 256)


def onnx_blockers(gm: torch.fx.GraphModule) -> list[str]:
    """Why the quantized ops of ``gm`` would not run in ONNX Runtime (empty when they all would)."""
    found = []
    for node in gm.graph.nodes:
        parsed = parse_op(node.target) if node.op == "call_function" else None
        if parsed and parsed[0] == "nf4":
            block = split_args(SCHEMES["nf4"], parsed[1], node.args)[3][1]
            if block not in MATMULBNB4_BLOCKS:
                found.append(f"{node.name}: NF4 block={block}; ONNX Runtime's MatMulBnb4 takes blocks of "
                             f"{', '.join(map(str, MATMULBNB4_BLOCKS))} values")
    return found


def _lower_grouped_mm(x, weight, offs):
    """``transformers.grouped_mm_fallback(x, weight, offs)``: x (S × in) has its rows sorted by expert, weight
    is E × in × out and offs (E) the cumulative row count per expert, so expert e's rows are
    offs[e-1] … offs[e] - 1 and out[r] = x[r] @ weight[e]. E is the weight's static first dimension: one
    ``Gather`` of the rows and one ``MatMul`` per expert, concatenated (as transformers' own ONNX exporter
    lowers ``aten._grouped_mm``); an expert with no rows gives an empty block."""
    op, _ = _opsets()
    experts = weight.shape[0]
    if not isinstance(experts, int):
        raise ValueError("grouped_mm_fallback: the number of experts must be static")
    ends = op.Split(op.Cast(offs, to=7), axis=0, num_outputs=experts) if experts > 1 else [op.Cast(offs, to=7)]
    weights = op.Split(weight, axis=0, num_outputs=experts) if experts > 1 else [weight]
    axes, one, start = _const(op, [0]), op.Constant(value_int=1), op.Constant(value_int=0)
    blocks = []
    for end, w in zip(ends, weights):
        end = op.Squeeze(end, axes)
        rows = op.Gather(x, op.Range(start, end, one), axis=0)
        blocks.append(op.MatMul(rows, op.Squeeze(w, axes)))
        start = end
    return op.Concat(*blocks, axis=0) if experts > 1 else blocks[0]


def _custom_ops() -> dict:
    """Third-party custom ops a captured model can hold, to their lowerings (those importable here)."""
    grouped = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    return {grouped.default: _lower_grouped_mm} if grouped is not None else {}


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: every quantized op and every known custom op
    (:func:`_custom_ops`) to its ONNX lowering, and attention to peftc's (:mod:`peftc.export.attention_onnx`)."""
    table = {op(s.name, layout): _lowering(s, layout) for s in SCHEMES.values() for layout in LAYOUTS}
    table.update(_custom_ops())
    table[torch.ops.aten.scaled_dot_product_attention.default] = lower_sdpa
    return table
