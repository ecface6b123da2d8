"""Quantized linears as torch custom ops, with a fake (meta) kernel and an autograd formula.

Each scheme (nf4, int8, int4) gets two ops that differ only in argument order, so that a rewritten node
keeps the input ``x`` where the op it replaces had it:

    peftc::<scheme>_linear(Tensor x, <weight tensors>, Tensor? bias, <params>)   replaces aten.linear(x, w, b)
    peftc::<scheme>_addmm(Tensor? bias, Tensor x, <weight tensors>, <params>)    replaces aten.addmm(b, x, w)

Both compute ``x @ dequant(W).T + bias`` with W stored out × in. The weights get no gradient (they are
buffers); ``x`` gets ``grad @ dequant(W)`` and a bias that requires grad gets the summed gradient, so LoRA
trains on top (QLoRA) and the graph survives ``torch.export``. Their ONNX lowerings are in
:mod:`peftc.export.lowerings`."""
from __future__ import annotations

from typing import Sequence

import torch

from peftc.quant import int4, int8, nf4
from peftc.quant.scheme import Scheme

NAMESPACE = "peftc"
LAYOUTS = ("linear", "addmm")
_LIB = torch.library.Library(NAMESPACE, "DEF")   # kept alive for the life of the process


#: every quantized weight format, by name: each one's ``SCHEME`` (its tensors, params and dequantization)
SCHEMES: dict[str, Scheme] = {s.name: s for s in (nf4.SCHEME, int8.SCHEME, int4.SCHEME)}


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
