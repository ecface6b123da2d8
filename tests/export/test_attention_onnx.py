"""peftc's ONNX lowering of scaled_dot_product_attention (grouped queries without repeating the cache) gives
torch's attention in ONNX Runtime, for every form the captured models use."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from peftc.export.lowerings import translation_table
from numerics import ONNX_RUNTIME, assert_close

B, S, T, D = 2, 3, 7, 8


class Attention(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kwargs)


def inputs(heads, kv_heads, mask_kind):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((heads, S), (kv_heads, T), (kv_heads, T)))
    if mask_kind == "bool":        # left padding in row 1 and a causal band: every query sees something
        visible = torch.ones(S, T, dtype=torch.bool).tril(T - S)
        mask = visible.expand(B, 1, S, T).clone()
        mask[1, :, :, :2] = False
        return q, k, v, mask
    if mask_kind == "padding row":     # one row for every query (B, 1, 1, T): row 1 left-padded
        mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
        mask[1, ..., :3] = False
        return q, k, v, mask
    if mask_kind == "float per head":   # ALiBi-like: a bias for every query head
        return q, k, v, torch.randn(B, heads, S, T, generator=g)
    return q, k, v


def onnx_run(module, args, path):
    names = ["q", "k", "v", "mask"][:len(args)]
    batch, seq, total = (torch.export.Dim(n) for n in ("batch", "seq", "total"))
    mask_axes = {0: batch, 3: total} if len(args) > 3 and args[3].shape[2] == 1 else {0: batch, 2: seq, 3: total}
    shapes = [{0: batch, 2: seq}, {0: batch, 2: total}, {0: batch, 2: total}, mask_axes]
    program = torch.onnx.export(module, args, dynamo=True, input_names=names, dynamic_shapes=shapes[:len(args)],
                                custom_translation_table=translation_table())
    program.save(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: a.numpy() for n, a in zip(names, args)})[0], ops


@pytest.mark.parametrize("heads, kv_heads, mask_kind, kwargs", [
    (6, 2, "bool", {}), (6, 2, "padding row", {}), (6, 2, "float per head", {"scale": 0.3}), (6, 2, None, {}), (4, 1, None, {"is_causal": True}),
    (4, 4, "bool", {}), (4, 4, "float per head", {}), (4, 4, None, {"is_causal": True})])
def test_attention_in_onnx_runtime_equals_torch(heads, kv_heads, mask_kind, kwargs, tmp_path):
    kwargs = dict(kwargs, enable_gqa=heads != kv_heads)
    module = Attention(**kwargs)
    args = inputs(heads, kv_heads, mask_kind)
    with torch.no_grad():
        expected = module(*args)
    got, ops = onnx_run(module, args, tmp_path / "a.onnx")
    assert got.shape == tuple(expected.shape)
    assert_close(torch.from_numpy(got), expected, rel=ONNX_RUNTIME, why="ONNX Runtime's float32 kernels sum "
                 "the two matmuls in another order")
    assert "Expand" not in ops, "the keys and values are not repeated per query head"
