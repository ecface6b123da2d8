import onnx
import pytest
import torch

import peftc
from peftc.export.onnx import onnx_op_counts
from conftest import randomize_adapters
from numerics import ONNX_RUNTIME, REORDERED, assert_close, assert_export_close


@pytest.fixture(scope="module")
def merged_and_base():
    model = peftc.compile(peftc.load_model("tiny-llama"), "lora q, v, down r=4 alpha=8")
    randomize_adapters(model)
    return model, model.merge(), peftc.compile(peftc.load_model("tiny-llama"), "")


@pytest.mark.slow
def test_merged_onnx_matches_torch_and_base_operator_counts(merged_and_base, tmp_path):
    _, merged, base = merged_and_base
    result = peftc.export_onnx(merged, tmp_path / "merged.onnx")
    assert_export_close(result)
    assert result.provider == "CPUExecutionProvider"
    base_result = peftc.export_onnx(base, tmp_path / "base.onnx", verify=False)
    assert result.op_counts == base_result.op_counts
    graph = onnx.load(str(tmp_path / "merged.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    dims = [d for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(d.dim_param for d in dims)              # batch and sequence are dynamic
    assert_export_close(result)
    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 5), (4, 23)]:                # shapes the export never saw
        ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones_like(ids)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            assert_close(got, merged(ids, mask), rel=ONNX_RUNTIME,
                         why="ONNX Runtime's kernels, on shapes the export never saw")


@pytest.mark.slow
def test_unmerged_onnx_keeps_the_lora_branch(merged_and_base, tmp_path):
    model, _, _ = merged_and_base
    result = peftc.export_onnx(model, tmp_path / "unmerged.onnx")
    assert_export_close(result)
    base_counts = onnx_op_counts(peftc.export_onnx(merged_and_base[2], tmp_path / "b.onnx", verify=False).path)
    assert result.op_counts["MatMul"] > base_counts["MatMul"]


@pytest.mark.parametrize("ref, spec", [("tiny-gpt2", "lora q, v r=4"), ("tiny-phi3", "lora v, gate r=2"),
                                       ("tiny-falcon", "lora k, o r=2")])
@pytest.mark.slow
def test_sliced_lora_on_fused_projections_exports_merged_and_unmerged(ref, spec, tmp_path):
    model = peftc.compile(peftc.load_model(ref), spec)
    randomize_adapters(model)
    unmerged = peftc.export_onnx(model, tmp_path / "unmerged.onnx")
    assert_export_close(unmerged)
    assert unmerged.op_counts["Gather"] > 0                 # the block-diagonal B is placed by a Gather
    merged = peftc.export_onnx(model.merge(), tmp_path / "merged.onnx")
    assert_export_close(merged)
    base = peftc.export_onnx(peftc.compile(peftc.load_model(ref), ""), tmp_path / "base.onnx", verify=False)
    assert merged.op_counts == base.op_counts


@pytest.mark.slow
def test_external_data_and_atomic_write(merged_and_base, tmp_path):
    _, merged, _ = merged_and_base
    target = tmp_path / "ext.onnx"
    result = peftc.export_onnx(merged, target, external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    assert_export_close(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]


def test_failed_export_leaves_existing_file(tmp_path):
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"previous")

    class NotAModel(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            raise ValueError("cannot trace me")

    with pytest.raises(peftc.ExportError, match="cannot trace me"):
        peftc.export_onnx(NotAModel(), target)
    assert target.read_bytes() == b"previous"


@pytest.mark.parametrize("ref, route", [("tiny-llama", "direct"), ("tiny-falcon", "decomposed")])
@pytest.mark.slow
def test_both_conversion_routes_agree_with_torch(ref, route, tmp_path):
    """LLaMA's captured graph translates op by op; Falcon's has an in-place add and takes torch.onnx's
    decomposing route. Either way ONNX Runtime computes what torch computes, on shapes not seen in export."""
    model = peftc.compile(peftc.load_model(ref), "lora q, v r=4")
    randomize_adapters(model)
    merged = model.merge()
    result = peftc.export_onnx(merged, tmp_path / "m.onnx")
    assert result.route == route
    assert_export_close(result)
    import onnxruntime as ort
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        assert_close(got, merged(ids, mask), rel=ONNX_RUNTIME, why="ONNX Runtime's kernels")


@pytest.mark.slow
def test_merged_export_reuses_the_capture_and_equals_a_fresh_one(tmp_path):
    """A merge that folded everything leaves the captured graph as it was: the export converts the program
    torch.export gave at compile time, with the merged weights, instead of capturing again. Its ONNX gives
    what a fresh capture's ONNX gives; a model that keeps a branch is captured again."""
    import onnxruntime as ort
    model = peftc.compile(peftc.load_model("tiny-llama"), "lora q, v, down r=4 alpha=8\nia3 k")
    randomize_adapters(model)
    merged = model.merge()
    reused = peftc.export_onnx(merged, tmp_path / "reused.onnx")
    assert "reuse_capture" in reused.seconds and "capture" not in reused.seconds
    assert_export_close(reused)
    merged.base_program = None
    fresh = peftc.export_onnx(merged, tmp_path / "fresh.onnx")
    assert "capture" in fresh.seconds
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(5))
    feed = {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    outputs = [ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
               .run(None, feed)[0] for name in ("reused", "fresh")]
    assert_close(outputs[0], outputs[1], rel=REORDERED, why="two captures of one graph may order their ops differently")
    unmerged = peftc.export_onnx(model, tmp_path / "unmerged.onnx", verify=False)
    assert "capture" in unmerged.seconds
