"""The ONNX rewrites after conversion (peftc.export.fusions): a rotate-half rotary embedding becomes ONNX
Runtime's RotaryEmbedding only where that is exact, a residual sum and its RMS norm one
SkipSimplifiedLayerNormalization, dynamic view shapes constants; the exported decoder has the structure ONNX
Runtime GenAI's builder gives (two rotary embeddings and two skip norms a layer) and still decodes as torch does."""
import numpy as np
import onnx
import onnxruntime as ort
import torch

from numerics import ONNX_RUNTIME, assert_close
from peftc.export.genai import OnnxStep
from peftc.export.onnx import _convert
from test_export_genai import _merged

import peftc


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(torch.nn.Module):
    """``x·cos + rotate_half(x)·sin`` on (batch, heads, sequence, d), cos/sin (batch, sequence, d) either
    computed from angles as ``concat(f, f)`` (``tables=False``: halves equal) or given as inputs."""

    def __init__(self, tables: bool):
        super().__init__()
        self.tables = tables

    def forward(self, x, angles):
        if self.tables:
            cos, sin = angles.cos(), angles.sin()      # any (batch, sequence, d) table: halves differ
        else:
            both = torch.cat((angles, angles), dim=-1)
            cos, sin = both.cos() * 0.5, both.sin() * 0.5
        return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def _run(module, x, angles, tmp_path):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2)
    ep = torch.export.export(module, (x, angles), dynamic_shapes=({0: batch, 2: seq}, {0: batch, 1: seq}))
    program, _ = _convert(ep, (x, angles), ["x", "angles"], ["y"])
    program.save(str(tmp_path / "r.onnx"))
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "r.onnx")).graph.node]
    return session.run(None, {"x": x.numpy(), "angles": angles.numpy()})[0], ops


def test_rotary_embedding_fused_only_where_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)
    for tables, width in ((False, 4), (True, 8)):
        module = Rotary(tables)
        angles = torch.randn(2, 5, width, generator=g) * 3
        with torch.no_grad():
            expected = module(x, angles)
        got, ops = _run(module, x, angles, tmp_path)
        assert ("RotaryEmbedding" in ops) is not tables, ops
        assert ("Neg" in ops) is tables
        assert_close(torch.from_numpy(got), expected, rel=ONNX_RUNTIME,
                     why="ONNX Runtime's rotary kernel multiplies and adds the same float32 values")


def test_decoder_has_the_builders_fused_structure_and_decodes_as_torch(tmp_path):
    """tiny-llama (2 layers): every rotary embedding, residual RMS norm and view shape rewritten; the export
    verified itself against torch, and one more left-padded batch decodes as the torch model's cache does."""
    _, merged = _merged("lora q, v r=4")
    result = peftc.export_genai(merged, tmp_path / "out")
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    layers = result.layers
    assert ops.count("RotaryEmbedding") == 2 * layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert "Neg" not in ops
    assert ops.count("Pow") == 1, "only the first norm (no residual sum before it) is left as ONNX ops"
    producers = {o: n for n in model.graph.node for o in n.output}
    shapes = [producers.get(n.input[1]) for n in model.graph.node if n.op_type == "Reshape"]
    assert not [p for p in shapes if p is not None and p.op_type == "Concat"], "no view shape is built at run time"
    step = OnnxStep(tmp_path / "out" / "model.onnx")
    ids = np.array([[0, 0, 5, 9, 17], [40, 41, 42, 43, 44]], np.int64)
    mask = (ids != 0).astype(np.int64)
    logits, _ = step(ids, mask, step.empty(2))
    with torch.no_grad():
        expected = merged(torch.from_numpy(ids), torch.from_numpy(mask))
    kept = torch.from_numpy(mask).bool()
    assert_close(torch.from_numpy(logits)[kept], expected[kept], rel=ONNX_RUNTIME,
                 why="ONNX Runtime's fused float32 kernels against torch's")
