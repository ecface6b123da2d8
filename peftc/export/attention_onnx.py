"""The ONNX lowering of ``aten.scaled_dot_product_attention``, in place of torch.onnx's.

torch.onnx (onnxscript's function) repeats a grouped-query attention's keys and values to every query head
(``Expand`` + ``Reshape``: a copy of the cache ``heads / kv_heads`` times the size, every layer, every step),
transposes the keys through a reshape and scales both queries and keys, each a copy of the keys. In a KV-cache
decoder step those copies of the whole past are most of what attention costs. Here the queries of the
``g = heads / kv_heads`` heads that share a key/value head are stacked on the sequence axis instead
(``(B, H, S, d) -> (B, H_kv, g·S, d)``, a free reshape, as head ``h`` reads kv head ``h // g``), so one
``MatMul`` against the untouched keys gives every group's scores; only the queries are scaled. The mask is
brought to that layout (:func:`_grouped_mask`) by constant-shape ops, computed once for the layers that share
it (ONNX Runtime merges the identical nodes), not by reshaping every layer's scores.

The arithmetic is the same softmax((Q·scale) Kᵀ + mask) V; a boolean mask adds the dtype's lowest value where
it is false, as torch.onnx's does (so a row that sees nothing averages instead of giving NaN)."""
from __future__ import annotations

import math


def lower_sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
               scale: float | None = None, enable_gqa: bool = False):
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=, enable_gqa=)`` on 4-D
    (batch, heads, sequence, head dim) inputs with static head counts (see the module doc)."""
    import onnxscript
    from onnxscript import ir
    op = onnxscript.opset18
    heads, kv_heads, dim, v_dim = query.shape[1], key.shape[1], query.shape[3], value.shape[3]
    if not all(isinstance(n, int) for n in (heads, kv_heads, dim, v_dim)) or heads % kv_heads:
        raise ValueError("scaled_dot_product_attention: head counts and sizes must be static, heads a multiple "
                         "of the key/value heads")
    if dropout_p:
        raise ValueError("scaled_dot_product_attention: dropout has no ONNX inference lowering")
    groups = heads // kv_heads
    mask_shape = None if attn_mask is None else attn_mask.shape

    def ints(*values):
        return op.Constant(value_ints=list(values))
    q = op.Mul(query, op.Constant(value=ir.tensor(scale if scale is not None else 1 / math.sqrt(dim),
                                                  dtype=query.dtype)))
    if groups > 1:
        q = op.Reshape(q, ints(0, kv_heads, -1, dim))
    scores = op.MatMul(q, op.Transpose(key, perm=[0, 1, 3, 2]))          # (B, H_kv, g·S, T)
    boolean = is_causal or (attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL)
    if is_causal:
        mask_shape = (None, None)
        lengths = op.Concat(op.Shape(query, start=2, end=3), op.Shape(key, start=2, end=3), axis=0)
        attn_mask = op.Trilu(op.ConstantOfShape(lengths, value=ir.tensor([True])), upper=0)
    if boolean:
        attn_mask = op.Where(attn_mask, op.Constant(value=ir.tensor(0.0, dtype=query.dtype)),
                             op.Constant(value=ir.tensor(query.dtype.min, dtype=query.dtype)))
    if groups > 1 and attn_mask is not None:
        attn_mask = _grouped_mask(op, attn_mask, mask_shape, kv_heads, groups, ints)
    weights = op.Softmax(scores if attn_mask is None else op.Add(scores, attn_mask), axis=-1)
    out = op.MatMul(weights, value)                                        # (B, H_kv, g·S, d_v)
    return op.Reshape(out, ints(0, heads, -1, v_dim)) if groups > 1 else out


def _grouped_mask(op, mask, shape, kv_heads: int, groups: int, ints):
    """A mask of ``shape`` (B|1, 1|H, S|1, T) (2-D and 3-D broadcast as 4-D) in the layout of the grouped
    scores (B, H_kv, g·S, T), whose row ``j·S + s`` of kv head ``k`` is query head ``k·g + j`` at ``s``: a
    per-head mask is the same memory viewed (B, H_kv, g·S, T), a mask shared by the heads is repeated ``g``
    times along the rows (unless it is one row for every query). Both views have constant shapes."""
    rank = len(shape)
    if rank < 4:
        mask = op.Unsqueeze(mask, ints(*range(4 - rank)))
        shape = (1,) * (4 - rank) + tuple(shape)
    if shape[1] == kv_heads * groups:
        return op.Reshape(mask, ints(0, kv_heads, -1, 0))
    if shape[1] != 1:
        raise ValueError(f"scaled_dot_product_attention: a mask over {shape[1]} heads for "
                         f"{kv_heads * groups} query heads")
    return mask if shape[2] == 1 else op.Concat(*[mask] * groups, axis=2)
