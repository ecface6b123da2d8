"""Quantized linears as torch custom ops, with a fake (meta) kernel, an autograd formula and an ONNX lowering.

Each scheme (nf4, int8, int4) gets two ops that differ only in argument order, so that a rewritten node
keeps the input ``x`` where the op it replaces had it:

    peftc::<scheme>_linear(Tensor x, <weight tensors>, Tensor? bias, <params>)   replaces aten.linear(x, w, b)
    peftc::<scheme>_addmm(Tensor? bias, Tensor x, <weight tensors>, <params>)    replaces aten.addmm(b, x, w)

Both compute ``x @ dequant(W).T + bias`` with W stored out × in. The weights get no gradient (they are
buffers); ``x`` gets ``grad @ dequant(W)`` and a bias that requires grad gets the summed gradient, so LoRA
trains on top (QLoRA) and the graph survives ``torch.export``. ``translation_table()`` maps every op to an
onnxscript lowering for ``torch.onnx.export(..., custom_translation_table=...)``: NF4 to
``com.microsoft.MatMulBnb4``, int4 to ``com.microsoft.MatMulNBits``, int8 to a dequantizing MatMul."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from peftc.quant import int4 as int4_format
from peftc.quant import nf4 as nf4_format
from peftc.quant.int8 import INV_127

NAMESPACE = "peftc"
LAYOUTS = ("linear", "addmm")
_LIB = torch.library.Library(NAMESPACE, "DEF")   # kept alive for the life of the process


@dataclass(frozen=True)
class Scheme:
    name: str
    tensors: tuple[str, ...]        # weight tensor arguments in schema order; a trailing '?' marks optional
    params: tuple[str, ...]         # non-tensor arguments, as schema text ("int[] shape")
    dequantize: Callable            # (weight tensors, params) -> float32 (out, in)
    lower: Callable                 # ONNX: (x, weight values, params) -> y without bias

    @property
    def n_tensors(self) -> int:
        return len(self.tensors)


# --- dequantization in torch -------------------------------------------------------------------------

@functools.cache
def _nf4_pairs() -> torch.Tensor:
    """Both code values of each byte, high nibble first: a 256 × 2 table, so unpacking is one gather."""
    byte = torch.arange(256)
    return torch.stack((nf4_format.CODE[byte >> 4], nf4_format.CODE[byte & 0xF]), dim=1)


def nf4_absmax(absmax, absmax_scale, absmax_offset) -> torch.Tensor:
    if absmax_scale is None:
        return absmax
    return nf4_format.dequantize_dynamic(absmax, absmax_scale) + absmax_offset


def _nf4_dequantize(tensors, params) -> torch.Tensor:
    packed, absmax, scale, offset = tensors
    (out_f, in_f), block = params
    n = out_f * in_f
    values = _nf4_pairs().index_select(0, packed.reshape(-1).int()).view(-1)
    per_block = nf4_absmax(absmax, scale, offset)
    if n % block == 0:     # in place: the transient memory of a forward is the weight, once
        return values.view(-1, block).mul_(per_block.view(-1, 1)).view(out_f, in_f)
    return values[:n].mul_(per_block.repeat_interleave(block)[:n]).view(out_f, in_f)


def _int8_dequantize(tensors, params) -> torch.Tensor:
    qweight, absmax = tensors
    return qweight * absmax.view(-1, 1) * INV_127


def _int4_dequantize(tensors, params) -> torch.Tensor:
    packed, scales, zero_points = tensors
    (_out_f, in_f), _block = params
    return int4_format.dequantize(packed, scales, zero_points, in_f)


# --- ONNX lowerings ------------------------------------------------------------------------------------

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
        group = nf4_format.DOUBLE_QUANT_BLOCK
        padded = -(-n_blocks // group) * group
        values = op.Gather(_const(op, nf4_format.dynamic_map().numpy()), op.Cast(absmax, to=7))
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


SCHEMES: dict[str, Scheme] = {
    "nf4": Scheme("nf4", ("packed", "absmax", "absmax_scale?", "absmax_offset?"), ("int[] shape", "int block_size"),
                  _nf4_dequantize, _lower_nf4),
    "int8": Scheme("int8", ("qweight", "absmax"), (), _int8_dequantize, _lower_int8),
    "int4": Scheme("int4", ("packed", "scales", "zero_points"), ("int[] shape", "int block_size"),
                   _int4_dequantize, _lower_int4),
}


# --- the ops --------------------------------------------------------------------------------------------

def _out_features(scheme: Scheme, tensors, params) -> int:
    return params[0][0] if scheme.params else tensors[0].shape[0]


def split_args(scheme: Scheme, layout: str, args: Sequence):
    """(x, weight tensors, bias, params) from an op's positional arguments."""
    k = scheme.n_tensors
    if layout == "linear":
        return args[0], tuple(args[1:1 + k]), args[1 + k], tuple(args[2 + k:])
    return args[1], tuple(args[2:2 + k]), args[0], tuple(args[2 + k:])


def _positions(scheme: Scheme, layout: str) -> tuple[int, int]:
    """Argument positions of x and bias."""
    return (0, 1 + scheme.n_tensors) if layout == "linear" else (1, 0)


def _schema(scheme: Scheme, layout: str) -> str:
    tensors = ", ".join(f"Tensor{'?' if t.endswith('?') else ''} {t.rstrip('?')}" for t in scheme.tensors)
    params = "".join(f", {p}" for p in scheme.params)
    if layout == "linear":
        return f"{scheme.name}_linear(Tensor x, {tensors}, Tensor? bias{params}) -> Tensor"
    return f"{scheme.name}_addmm(Tensor? bias, Tensor x, {tensors}{params}) -> Tensor"


def dequantize_weight(scheme: str, tensors: Sequence, params: Sequence) -> torch.Tensor:
    """The float32 (out × in) weight a quantized op multiplies by."""
    return SCHEMES[scheme].dequantize(tuple(tensors), tuple(params))


def _define(scheme: Scheme, layout: str) -> None:
    _LIB.define(_schema(scheme, layout))
    qualname = f"{NAMESPACE}::{scheme.name}_{layout}"
    x_at, bias_at = _positions(scheme, layout)

    def forward(*args):
        x, tensors, bias, params = split_args(scheme, layout, args)
        weight = scheme.dequantize(tensors, params).to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)

    def fake(*args):
        x, tensors, _bias, params = split_args(scheme, layout, args)
        return x.new_empty((*x.shape[:-1], _out_features(scheme, tensors, params)))

    def setup_context(ctx, inputs, output):
        _x, tensors, bias, params = split_args(scheme, layout, inputs)
        ctx.save_for_backward(*tensors)
        ctx.params = params
        ctx.has_bias = bias is not None
        ctx.n_inputs = len(inputs)

    def backward(ctx, grad):
        grads = [None] * ctx.n_inputs
        if ctx.needs_input_grad[x_at]:
            grads[x_at] = grad @ scheme.dequantize(ctx.saved_tensors, ctx.params).to(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[bias_at]:
            grads[bias_at] = grad.reshape(-1, grad.shape[-1]).sum(0)
        return tuple(grads)

    torch.library.register_kernel(qualname, None, forward, lib=_LIB)
    torch.library.register_fake(qualname, fake, lib=_LIB)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)


for _scheme in SCHEMES.values():
    for _layout in LAYOUTS:
        _define(_scheme, _layout)


def op(scheme: str, layout: str):
    """The op overload, e.g. ``op("nf4", "linear")`` is ``torch.ops.peftc.nf4_linear.default``."""
    return getattr(getattr(torch.ops, NAMESPACE), f"{scheme}_{layout}").default


def parse_op(target) -> tuple[str, str] | None:
    """(scheme, layout) of one of these ops, or None for any other target."""
    for scheme in SCHEMES:
        for layout in LAYOUTS:
            if target is op(scheme, layout):
                return scheme, layout
    return None


def _lowering(scheme: Scheme, layout: str):
    def lower(*args):
        x, tensors, bias, params = split_args(scheme, layout, args)
        y = scheme.lower(x, tensors, params)
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


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: every quantized op to its ONNX lowering."""
    return {op(s.name, layout): _lowering(s, layout) for s in SCHEMES.values() for layout in LAYOUTS}
