"""Rewrites of a converted ONNX graph (onnx_ir) into fewer, larger ops, where ONNX Runtime does not fuse them
itself when it loads the model. Each computes the same arithmetic (a fused kernel may round in another order,
as any ONNX Runtime kernel may), and every exported file is verified against torch after them.

- :func:`static_reshapes`: torch.onnx builds each ``view``/``reshape`` target shape at run time from the
  input's dynamic sizes (``Shape`` → ``Squeeze`` → ``Reshape`` → ``Concat``, three or four nodes per view). Where
  a dynamic entry is the size the data already has on the same axis (the same symbol), it becomes ``0``
  (ONNX's "copy this dimension"); one remaining dynamic entry becomes ``-1``. The shape is then a constant.
- :func:`rotary_embeddings`: the rotate-half rotary embedding ``x·cos + cat(-x₂, x₁)·sin`` (seven nodes for
  each of the queries and keys of every layer) becomes one ``com.microsoft.RotaryEmbedding``. That op takes a
  cache of ``cos``/``sin`` half-rows and a position per token; the graph's own per-token ``cos``/``sin`` (batch,
  sequence, head dim), computed once a step from the true positions, are the cache, flattened to
  (batch·sequence, head dim / 2), and the positions index it: ``arange(batch·sequence)``. It applies only where
  the two halves of ``cos`` and ``sin`` are equal by construction (elementwise functions of
  ``concat(f, f)``), as rotate-half rotary embeddings compute them.
- :func:`skip_rms_norms`: a residual sum ``r = a + b`` read by an RMS norm ``w · r / sqrt(mean(r²) + ε)``
  becomes one ``com.microsoft.SkipSimplifiedLayerNormalization`` (which also returns ``r`` for the next
  residual), as ONNX Runtime GenAI's builder writes it; float32 norms only (a half-precision graph casts in
  between). ONNX Runtime fuses a lone RMS norm itself, not the sum.
- :func:`packed_matmuls`: the matmuls that read one input with constant weights of the same kind (a layer's
  query, key and value projections; its gate and up projections) become one matmul over the weights side by
  side, split back into the original outputs: one kernel call and, for ``MatMulNBits``, one quantization of
  the input instead of three. Weights that are graph inputs (an adapter's, which ONNX Runtime switches by
  name) are never packed.

In a SmolLM2-135M KV-cache decoder they take a step from 1521 nodes to 948, as ONNX Runtime counts them after
its own fusions (the builder's model: 309)."""
from __future__ import annotations

from collections import Counter

import onnx_ir as ir

#: ONNX ops whose output's two halves on the last axis are equal when their input's are
_HALF_PRESERVING = {"Cos", "Sin", "Cast", "Mul", "Identity"}


def fuse(model: ir.Model) -> Counter:
    """Run every rewrite on ``model``'s main graph (before its inputs' axes are renamed: the rewrites compare
    the size symbols torch.onnx gave every value). Returns how many sites each rewrite changed."""
    import onnxscript.optimizer
    done = Counter(static_reshapes=static_reshapes(model.graph), rotary_embeddings=rotary_embeddings(model),
                   skip_rms_norms=skip_rms_norms(model), packed_matmuls=packed_matmuls(model))
    onnxscript.optimizer.remove_unused_nodes(model)
    return done


def _op(node: ir.Node | None, *names: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in names


def _ints(value: ir.Value | None) -> list[int] | None:
    """The constant integer vector (or scalar) ``value`` holds, or None."""
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def _int64(values, name: str | None = None) -> ir.Node:
    """A ``Constant`` node of int64 ``values`` (a list: a vector; an int: a scalar)."""
    import numpy as np
    return ir.node("Constant", [], {"value": ir.tensor(np.array(values, np.int64), name=name)})


def _dims(shape: ir.Shape) -> list:
    """``shape``'s sizes, comparable across values: ints, and ("sym", name) for each dynamic size."""
    return [d if isinstance(d, int) else ("sym", str(d)) for d in shape]


def _shape_dims(part: ir.Value) -> list | None:
    """The sizes a shape-vector entry carries: a constant's integers, or for a value read off another's shape
    (``Shape(v, start, end)``, or one size of it squeezed and unsqueezed/reshaped back to a vector) the dims
    ``v`` has there, as its shape records them (symbols for dynamic sizes). None for anything else."""
    constant = _ints(part)
    if constant is not None:
        return constant
    node = part.producer()
    if _op(node, "Reshape", "Unsqueeze"):
        scalar = node.inputs[0].producer()
        if not _op(scalar, "Squeeze"):
            return None
        node = scalar.inputs[0].producer()
    if not _op(node, "Shape") or node.inputs[0].shape is None:
        return None
    dims = _dims(node.inputs[0].shape)
    start = node.attributes["start"].as_int() if "start" in node.attributes else 0
    end = node.attributes["end"].as_int() if "end" in node.attributes else len(dims)
    if start < 0 or end < 0:
        return None
    return dims[start:end]


def static_reshapes(graph: ir.Graph) -> int:
    """See the module doc. Returns how many ``Reshape`` shapes became constants."""
    changed = 0
    for node in list(graph):
        if not _op(node, "Reshape") or node.inputs[0].shape is None or (
                "allowzero" in node.attributes and node.attributes["allowzero"].as_int()):
            continue
        concat = node.inputs[1].producer()
        if not _op(concat, "Concat"):
            continue
        parts = [_shape_dims(p) for p in concat.inputs]
        if any(p is None for p in parts):
            continue
        source = _dims(node.inputs[0].shape)
        target = [d for p in parts for d in p]
        shape = [0 if isinstance(d, tuple) and i < len(source) and source[i] == d else d
                 for i, d in enumerate(target)]
        unknown = [i for i, d in enumerate(shape) if isinstance(d, tuple)]
        if len(unknown) > 1 or (unknown and -1 in shape):
            continue
        for i in unknown:
            shape[i] = -1
        constant = _int64(shape, f"{node.outputs[0].name}_shape")
        graph.insert_before(node, constant)
        node.replace_input_with(1, constant.outputs[0])
        changed += 1
    return changed


def _equal_halves(value: ir.Value) -> bool:
    """Whether ``value``'s two halves on its last axis are equal by construction: an elementwise chain
    (scalar factors only) from ``concat(f, f)`` on the last axis."""
    node = value.producer()
    while _op(node, *_HALF_PRESERVING):
        if node.op_type == "Mul":
            scalars = [v for v in node.inputs if v.shape is not None and v.shape.rank() == 0]
            if len(scalars) != 1:
                return False
            value = next(v for v in node.inputs if v is not scalars[0])
        else:
            value = node.inputs[0]
        node = value.producer()
    if not (_op(node, "Concat") and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]):
        return False
    axis, shape = node.attributes["axis"].as_int(), node.inputs[0].shape
    return axis == -1 or (shape is not None and axis == shape.rank() - 1)


def _last_axis_slice(node: ir.Node | None, x: ir.Value) -> tuple[int, int] | None:
    """(start, end) of ``node`` if it is a unit-step ``Slice`` of ``x`` on its last axis."""
    if not _op(node, "Slice") or node.inputs[0] is not x:
        return None
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or steps != [1] or axes[0] not in (-1, 3):
        return None
    return starts[0], min(ends[0], x.shape[-1])


def _rotary_site(add: ir.Node):
    """``(x, cos, sin)`` if ``add`` is ``x·unsqueeze(cos, 1) + cat(-x[..., h:], x[..., :h])·unsqueeze(sin, 1)``
    on a 4-D (batch, heads, sequence, 2h) ``x``, with cos and sin (batch, sequence, 2h) of equal halves."""
    products = [v.producer() for v in add.inputs]
    if not all(_op(p, "Mul") for p in products):
        return None
    for rotated_product, plain_product in (products, products[::-1]):
        cat = next((v for v in rotated_product.inputs if _op(v.producer(), "Concat")), None)
        if cat is None or len(cat.producer().inputs) != 2:
            continue
        neg, first = cat.producer().inputs
        if not _op(neg.producer(), "Neg"):
            continue
        sin = next(v for v in rotated_product.inputs if v is not cat)
        x = first.producer().inputs[0] if _op(first.producer(), "Slice") else None
        if x is None or x not in plain_product.inputs or x.shape is None or x.shape.rank() != 4:
            continue
        cos = next(v for v in plain_product.inputs if v is not x)
        half = x.shape[-1] // 2 if isinstance(x.shape[-1], int) else None
        if (half is None or _last_axis_slice(first.producer(), x) != (0, half)
                or _last_axis_slice(neg.producer().inputs[0].producer(), x) != (half, 2 * half)):
            continue
        tables = [_unsqueezed_table(v, x) for v in (cos, sin)]
        if None not in tables:
            return x, *tables
    return None


def _unsqueezed_table(value: ir.Value, x: ir.Value) -> ir.Value | None:
    """The (batch, sequence, head dim) table ``t`` if ``value`` is ``unsqueeze(t, 1)`` with ``x``'s batch,
    sequence and head-dim sizes and equal halves."""
    node = value.producer()
    if not _op(node, "Unsqueeze") or _ints(node.inputs[1]) != [1]:
        return None
    table = node.inputs[0]
    if table.shape is None or table.shape.rank() != 3 or table.dtype != x.dtype:
        return None
    if [str(d) for d in table.shape] != [str(x.shape[0]), str(x.shape[2]), str(x.shape[3])]:
        return None
    return table if _equal_halves(table) else None


def rotary_embeddings(model: ir.Model) -> int:
    """See the module doc. Returns how many rotary embeddings became ``com.microsoft.RotaryEmbedding``."""
    graph = model.graph
    caches: dict[ir.Value, ir.Value] = {}
    positions: dict[str, ir.Value] = {}
    fused = 0
    for add in list(graph):
        site = _op(add, "Add") and _rotary_site(add)
        if not site:
            continue
        x, cos, sin = site
        key = str(list(cos.shape)[:2])
        if key not in positions:
            positions[key] = _flat_positions(graph, cos)
        for table in (cos, sin):
            if table not in caches:
                caches[table] = _half_rows(graph, table, x.shape[-1] // 2)
        node = ir.node("RotaryEmbedding", [x, positions[key], caches[cos], caches[sin]], {"interleaved": 0},
                       domain="com.microsoft", name=f"{add.outputs[0].name}_rotary")
        graph.insert_before(add, node)
        _replace(add.outputs[0], node.outputs[0])
        fused += 1
    if fused:
        model.opset_imports.setdefault("com.microsoft", 1)
    return fused


def _replace(old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` reads ``new``, which takes its shape, type and, if ``old`` is a graph output, its
    place and name."""
    if old.type is not None:
        new.shape, new.type = old.shape, old.type
    if old.is_graph_output():
        name, old.name = old.name, f"{old.name}_unfused"
        new.name = name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


def _after(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    """Insert ``nodes`` right after ``value``'s producer; the last node's output."""
    graph.insert_after(value.producer(), nodes)
    return nodes[-1].outputs[0]


def _flat_positions(graph: ir.Graph, table: ir.Value) -> ir.Value:
    """``arange(batch·sequence).reshape(batch, sequence)`` for ``table`` (batch, sequence, ·)."""
    shape = ir.node("Shape", [table], {"start": 0, "end": 2})
    count = ir.node("ReduceProd", [shape.outputs[0]], {"keepdims": 0})
    zero, one = _int64(0), _int64(1)
    arange = ir.node("Range", [zero.outputs[0], count.outputs[0], one.outputs[0]])
    flat = ir.node("Reshape", [arange.outputs[0], shape.outputs[0]])
    return _after(graph, table, [shape, count, zero, one, arange, flat])


def _half_rows(graph: ir.Graph, table: ir.Value, half: int) -> ir.Value:
    """``table[..., :half]`` as (batch·sequence, half) rows."""
    starts, ends, axes, rows = _int64([0]), _int64([half]), _int64([-1]), _int64([-1, half])
    cut = ir.node("Slice", [table, starts.outputs[0], ends.outputs[0], axes.outputs[0]])
    flat = ir.node("Reshape", [cut.outputs[0], rows.outputs[0]])
    return _after(graph, table, [starts, ends, axes, rows, cut, flat])


def _scalar(value: ir.Value) -> float | None:
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None or tensor.size != 1 else float(tensor.numpy().reshape(-1)[0])


def _rms_norm(mul: ir.Node) -> tuple[ir.Value, ir.Value, float] | None:
    """``(r, w, ε)`` if ``mul`` is ``w · (r / sqrt(mean(r², last axis) + ε))`` with a constant 1-D ``w``."""
    weight, div = mul.inputs if _op(mul.inputs[1].producer(), "Div") else mul.inputs[::-1]
    div = div.producer()
    if (not _op(div, "Div") or ir.convenience.get_const_tensor(weight) is None or weight.shape is None
            or weight.shape.rank() != 1):
        return None
    r, root = div.inputs
    add = root.producer().inputs[0].producer() if _op(root.producer(), "Sqrt") else None
    if not _op(add, "Add"):
        return None
    mean, eps = add.inputs if _op(add.inputs[0].producer(), "ReduceMean") else add.inputs[::-1]
    mean, eps = mean.producer(), _scalar(eps)
    if not _op(mean, "ReduceMean") or eps is None or _ints(mean.inputs[1]) not in ([-1], [r.shape.rank() - 1]):
        return None
    square = mean.inputs[0].producer()
    if not _op(square, "Pow") or square.inputs[0] is not r or _scalar(square.inputs[1]) != 2.0:
        return None
    return r, weight, eps


def skip_rms_norms(model: ir.Model) -> int:
    """See the module doc. Returns how many residual sums and RMS norms became one node."""
    graph = model.graph
    fused = 0
    for mul in list(graph):
        norm = _op(mul, "Mul") and mul.inputs[0].dtype == ir.DataType.FLOAT and _rms_norm(mul)
        if not norm:
            continue
        r, weight, eps = norm
        total = r.producer()
        if (not _op(total, "Add") or total.inputs[0].shape is None or r.is_graph_output()
                or [str(d) for d in total.inputs[0].shape] != [str(d) for d in (total.inputs[1].shape or ())]
                or weight.shape[0] != r.shape[-1]):
            continue
        node = ir.node("SkipSimplifiedLayerNormalization", [*total.inputs, weight], {"epsilon": eps},
                       domain="com.microsoft", num_outputs=4, name=f"{mul.outputs[0].name}_skip_norm")
        graph.insert_after(total, node)
        out, _mean, _inv_std, summed = node.outputs
        _replace(mul.outputs[0], out)
        _replace(r, summed)
        fused += 1
    if fused:
        model.opset_imports.setdefault("com.microsoft", 1)
    return fused


#: how each packable op holds its output features: (domain, op) -> (its weight inputs, the axis of N in each)
_PACKABLE = {("", "MatMul"): ((1,), 1), ("com.microsoft", "MatMulNBits"): ((1, 2, 3), 0)}


def _packable(node: ir.Node) -> tuple[tuple[int, ...], int] | None:
    return _PACKABLE.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))


def _weights(node: ir.Node) -> tuple | None:
    """The packing key of a matmul with constant, non-input weights (its op, attributes but N, and the
    shape of each weight off the N axis), or None."""
    layout = _packable(node)
    if layout is None or len(node.inputs) != max(layout[0]) + 1:     # with a bias or g_idx input: not packed
        return None
    inputs, axis = layout
    weights = [node.inputs[i] for i in inputs]
    if any(w is None or w.const_value is None or not w.is_initializer() or w.is_graph_input() for w in weights):
        return None
    if node.op_type == "MatMul" and weights[0].shape.rank() != 2:
        return None
    shapes = tuple(tuple(d for i, d in enumerate(w.shape) if i != axis) + (w.dtype,) for w in weights)
    attributes = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items() if k != "N"))
    return node.op_type, attributes, shapes


def _concatenated(tensors: list, axis: int, name: str):
    """The tensors joined on ``axis``, computed when the file is written."""
    import functools

    import numpy as np
    shape = list(tensors[0].shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)

    def join(parts):
        return ir.Tensor(np.concatenate([t.numpy() for t in parts], axis=axis), name=name)
    return ir.LazyTensor(functools.partial(join, tensors), dtype=tensors[0].dtype, shape=ir.Shape(shape), name=name)


def _pack(graph: ir.Graph, group: list[ir.Node]) -> None:
    first = group[0]
    inputs, axis = _packable(first)
    packed = list(first.inputs)
    for i in inputs:
        name = f"{first.outputs[0].name}_packed_{i}"
        tensor = _concatenated([n.inputs[i].const_value for n in group], axis, name)
        packed[i] = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(packed[i])
    sizes = [n.inputs[inputs[0]].shape[axis] for n in group]
    attributes = {k: a for k, a in first.attributes.items() if k != "N"}
    if first.op_type == "MatMulNBits":
        attributes["N"] = ir.AttrInt64("N", sum(sizes))
    matmul = ir.Node(first.domain, first.op_type, packed, attributes=list(attributes.values()),
                     name=f"{first.outputs[0].name}_packed")
    sizes_node = _int64(sizes)
    split = ir.node("Split", [matmul.outputs[0], sizes_node.outputs[0]], {"axis": -1}, num_outputs=len(group))
    graph.insert_before(first, [sizes_node, matmul, split])
    for node, out in zip(group, split.outputs):
        _replace(node.outputs[0], out)


def packed_matmuls(model: ir.Model) -> int:
    """See the module doc. Returns how many matmuls were packed into others."""
    groups: dict[tuple, list[ir.Node]] = {}
    for node in model.graph:
        key = node.inputs and node.inputs[0] is not None and _weights(node)
        if key:
            groups.setdefault((id(node.inputs[0]), key), []).append(node)
    packed = 0
    for group in groups.values():
        if len(group) > 1:
            _pack(model.graph, group)
            packed += len(group) - 1
    return packed
