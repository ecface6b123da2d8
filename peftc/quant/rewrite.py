"""Turning a linear of a captured graph into a quantized one and back, in place.

``quantize_site`` replaces ``aten.linear(x, W, b)`` by ``peftc::<scheme>_linear(x, <W quantized>, b, ...)``
(and ``aten.addmm(b, x, W)`` of a GPT-2 Conv1D by ``peftc::<scheme>_addmm(b, x, ...)``): the node keeps
its name, its users and the position of ``x``, so a later pass (LoRA) finds the site as before. The
quantized tensors are buffers of a small ``QuantizedWeight`` module on the graph module; the float weight
is removed from the graph module when nothing else uses it (a tied embedding keeps it).
``dequantize_site`` does the reverse with a given float weight (what ``merge()`` folds LoRA into)."""
from __future__ import annotations

from operator import attrgetter

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.quant import ops as qops
from peftc.quant.scheme import Quantized, stored_bytes
from peftc.graph.analysis import LinearSite, input_of, weight_of
from peftc.errors import ModelError
from peftc.weights import Checkpoint

aten = torch.ops.aten


class QuantizedWeight(nn.Module):
    """The stored form of one quantized weight in a graph module: a :class:`Quantized`'s tensors as buffers
    (never parameters) by its scheme's names, its params, and how to read it back."""

    def __init__(self, quantized: Quantized):
        super().__init__()
        self.scheme = quantized.scheme.name
        self.names = quantized.scheme.names
        self.params = quantized.params
        self.numel = quantized.numel
        for name in self.names:
            self.register_buffer(name, quantized.stored[name])

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The stored tensors in op-argument order (None for an absent optional one)."""
        return tuple(getattr(self, name) for name in self.names)

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.tensors())

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, out × in."""
        return qops.SCHEMES[self.scheme].dequantize(self.tensors(), self.params)

    def extra_repr(self) -> str:
        return f"{self.scheme}, params={self.params}, {self.nbytes} bytes"


def quantize_weight(weight: torch.Tensor, scheme: str, *, block_size: int = 64,
                    double_quant: bool = True) -> QuantizedWeight:
    """``weight`` (out × in) in ``scheme``: nf4 (bitsandbytes layout), int8 (per row) or int4 (MatMulNBits);
    each scheme takes the options it has (int8 none, int4 ``block_size``)."""
    if scheme not in qops.SCHEMES:
        raise ModelError(f"unknown quantization scheme '{scheme}'; schemes: {', '.join(qops.SCHEMES)}")
    found = qops.SCHEMES[scheme]
    given = {"block_size": block_size, "double_quant": double_quant}
    return QuantizedWeight(Quantized.of(found, weight, **{name: given[name] for name in found.options}))


def _nodes(gm: GraphModule) -> dict[str, Node]:
    return {n.name: n for n in gm.graph.nodes}


def float_weight(gm: GraphModule, site: LinearSite, checkpoint: Checkpoint | None = None) -> torch.Tensor:
    """The site's float weight as out × in (a Conv1D's in × out weight transposed). A streamed model's
    weight (still on the meta device) is read from ``checkpoint`` and not kept: what is quantized from it
    is its only stored form."""
    node = _nodes(gm)[site.node]
    _reader, weight_node = weight_of(node, site.kind)
    if not (isinstance(weight_node, Node) and weight_node.op == "get_attr"):
        raise ModelError(f"{site.path} is not a linear with a stored weight; it cannot be quantized")
    weight = attrgetter(weight_node.target)(gm)
    if weight.is_meta and checkpoint is not None:
        weight = checkpoint.read(weight_node.target, weight, mapped=False)
    return weight.detach().T if site.kind == "conv1d" else weight.detach()


def _drop_if_unused(gm: GraphModule, node: Node) -> None:
    """Erase a get_attr node nothing reads any more, and the tensor when no other node names it."""
    if node.users:
        return
    target = node.target
    gm.graph.erase_node(node)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    delattr(module, name)


#: the op computing a site of each kind, and the layout of the quantized op replacing it
KINDS = {"linear": (aten.linear.default, "linear"), "conv1d": (aten.addmm.default, "addmm"),
         "matmul": (aten.matmul.default, "linear")}
META = "peftc_quant"


def quantize_site(gm: GraphModule, site: LinearSite, module_name: str, weight: QuantizedWeight) -> list[Node]:
    """Rewrite the site's node to the quantized op reading ``weight`` (installed as ``module_name``).
    Returns the get_attr nodes inserted for its buffers."""
    node = _nodes(gm)[site.node]
    if site.kind not in KINDS:
        raise ModelError(f"{site.path}: quantizing a linear of kind '{site.kind}' is not supported")
    expected, layout = KINDS[site.kind]
    if node.target is not expected:
        raise ModelError(f"{site.path} is computed by {node.target}, not a plain linear; it cannot be quantized "
                         "(is it quantized already?)")
    reader, weight_node = weight_of(node, site.kind)
    x = input_of(node, site.kind)
    bias = None
    if site.kind == "linear":
        bias = node.args[2] if len(node.args) > 2 else None
    elif site.kind == "conv1d":
        bias = node.args[0]
        if node.kwargs:
            raise ModelError(f"{site.path}: addmm with beta/alpha {dict(node.kwargs)} cannot be quantized")
    else:   # matmul(x, W.T): the bias, if any, is a later add that stays where it is
        node.meta[META] = {"transpose": (reader.target, tuple(reader.args[1:]))}
    gm.add_submodule(module_name, weight)
    graph = gm.graph
    inserted = []
    with graph.inserting_before(node):
        args = []
        for name, tensor in zip(weight.names, weight.tensors()):
            if tensor is None:
                args.append(None)
            else:
                args.append(graph.get_attr(f"{module_name}.{name}"))
                inserted.append(args[-1])
    params = tuple(list(p) if isinstance(p, tuple) else p for p in weight.params)
    node.target = qops.op(weight.scheme, layout)
    node.args = (x, *args, bias, *params) if layout == "linear" else (bias, x, *args, *params)
    node.kwargs = {}
    if reader is not node and not reader.users:
        graph.erase_node(reader)
    _drop_if_unused(gm, weight_node)
    return inserted


def quantized_parts(gm: GraphModule, site: LinearSite) -> tuple[Node, str, str, QuantizedWeight]:
    """(node, scheme, layout, QuantizedWeight) of a quantized site."""
    node = _nodes(gm)[site.node]
    parsed = qops.parse_op(node.target)
    if parsed is None:
        raise ModelError(f"{site.path} is not quantized (its node computes {node.target})")
    scheme, layout = parsed
    x, tensors, _bias, _params = qops.split_args(qops.SCHEMES[scheme], layout, node.args)
    first = next(t for t in tensors if t is not None)
    module = gm.get_submodule(first.target.rpartition(".")[0])
    return node, scheme, layout, module


def dequantize_site(gm: GraphModule, site: LinearSite, weight: torch.Tensor, name: str) -> None:
    """Rewrite a quantized site back to ``aten.linear``/``aten.addmm`` with the float ``weight`` (out × in),
    registered as parameter ``name``; the quantized buffers are removed."""
    node, scheme, layout, module = quantized_parts(gm, site)
    x, tensors, bias, _params = qops.split_args(qops.SCHEMES[scheme], layout, node.args)
    stored = weight.T if site.kind == "conv1d" else weight
    gm.register_parameter(name, nn.Parameter(stored.detach().contiguous(), requires_grad=False))
    with gm.graph.inserting_before(node):
        weight_node = gm.graph.get_attr(name)
        if site.kind == "matmul":
            target, rest = node.meta.pop(META)["transpose"]
            transposed = gm.graph.call_function(target, (weight_node, *rest))
    if site.kind == "linear":
        node.target, node.args = aten.linear.default, (x, weight_node, bias)
    elif site.kind == "conv1d":
        node.target, node.args = aten.addmm.default, (bias, x, weight_node)
    else:
        node.target, node.args = aten.matmul.default, (x, transposed)
    for tensor_node in tensors:
        if tensor_node is not None:
            _drop_if_unused(gm, tensor_node)
    path = next(n for n, m in gm.named_modules() if m is module)
    if not any(n.op == "get_attr" and n.target.startswith(path + ".") for n in gm.graph.nodes):
        gm.delete_submodule(path)


def is_quantized(node: Node) -> bool:
    return node.op == "call_function" and qops.parse_op(node.target) is not None


def set_bias(node: Node, bias: Node) -> None:
    """Give a linear node, plain (``aten.linear``) or quantized, the bias ``bias``."""
    parsed = qops.parse_op(node.target) if node.op == "call_function" else None
    if parsed is None:
        node.args = (*node.args[:2], bias)
        return
    scheme, layout = parsed
    position = 1 + qops.SCHEMES[scheme].n_tensors if layout == "linear" else 0
    args = list(node.args)
    args[position] = bias
    node.args = tuple(args)
