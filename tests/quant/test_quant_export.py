"""Export of quantized models: the QLoRA graph itself, and the fp32, fp16, nf4 and int4 targets of a merge."""
import numpy as np
import pytest
from conftest import randomize_adapters

import peftc
from peftc.cli import main
from peftc.export.targets import export_target
from peftc.errors import ExportError
from numerics import assert_export_close

QLORA = "quant nf4 base\nlora q, v r=4 alpha=8"


@pytest.mark.slow
def test_quantized_graph_exports_and_runs_in_onnx_runtime(tiny, tmp_path):
    model = peftc.compile(tiny("tiny-llama"), QLORA, seed=0)
    randomize_adapters(model)
    result = peftc.export_onnx(model, tmp_path / "qlora.onnx")
    assert result.op_counts["MatMulBnb4"] == 28
    assert_export_close(result)


@pytest.fixture(scope="module")
def merged_qlora():
    model = peftc.compile(peftc.load_model("tiny-llama"), QLORA, seed=0)
    randomize_adapters(model, scale=0.05)
    return model.merge()


@pytest.fixture(scope="module")
def exported(merged_qlora, tmp_path_factory):
    """Each export target of the merged QLoRA model, written once for the tests below."""
    directory = tmp_path_factory.mktemp("targets")
    return {t: export_target(merged_qlora, directory / f"{t}.onnx", t) for t in ("fp32", "fp16", "nf4", "int4")}


#: tiny-llama: 4 layers of 7 linears and a head, 2 attention matmuls a layer. The float and int4 exports pack
#: each layer's q/k/v and gate/up projections into one matmul each (7 -> 4 a layer); MatMulBnb4 is not packed
@pytest.mark.parametrize("target,op,count", [("fp32", "MatMul", 4 * 4 + 1 + 8), ("fp16", "Cast", 32),
                                              ("nf4", "MatMulBnb4", 28), ("int4", "MatMulNBits", 4 * 4)])
@pytest.mark.slow
def test_each_export_target_runs_in_onnx_runtime(exported, target, op, count):
    result = exported[target]
    assert_export_close(result.export)          # ONNX Runtime vs the target's torch model
    assert result.export.op_counts[op] >= count
    assert result.export.size_bytes == result.export.path.stat().st_size
    if target == "fp32":
        assert result.vs_merged == 0
    else:
        assert 0 < result.vs_merged < 0.5 * result.merged_absmax
    if target in ("nf4", "int4"):
        assert result.quantized == 28 and 4 < result.bits_per_weight < 5


@pytest.mark.slow
def test_export_sizes_shrink_with_the_target(exported):
    size = {t: r.export.size_bytes for t, r in exported.items()}
    assert size["nf4"] < 0.75 * size["fp32"] and size["int4"] < 0.75 * size["fp32"]
    assert size["fp16"] < 0.8 * size["fp32"]


def test_nf4_export_refuses_a_block_onnx_runtime_cannot_run(merged_qlora, tmp_path):
    with pytest.raises(ExportError, match="MatMulBnb4 takes NF4 blocks of 16, 32, 64, 128, 256"):
        export_target(merged_qlora, tmp_path / "big.onnx", "nf4", block=1024)


@pytest.mark.slow
def test_cli_compile_prints_memory_and_export_nf4(tmp_path, capsys):
    spec = tmp_path / "qlora.peft"
    spec.write_text("quant nf4 base\nlora q, v r=4 init=random\n")
    out = tmp_path / "out"
    assert main(["compile", str(spec), "--model", "tiny-llama", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nf4" in printed and "bits per weight" in printed
    assert main(["export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--nf4"]) == 0
    printed = capsys.readouterr().out
    assert "LoRA folded onto dequant(W) of the 28 nf4 linears" in printed
    assert "nf4 logits vs the float32 merged model: max abs diff" in printed
    diff = float(printed.split("merged vs unmerged logits: max abs diff ")[1].split()[0])
    assert diff < 1e-5
    assert np.isfinite(diff)


def test_a_quantized_graph_with_a_block_onnx_runtime_cannot_run_is_refused_before_export(tiny, tmp_path):
    model = peftc.compile(tiny("tiny-llama"), "quant nf4 base block=512\nlora q r=2", seed=0)
    with pytest.raises(ExportError, match="NF4 block=512; ONNX Runtime's MatMulBnb4 takes blocks of 16, 32"):
        peftc.export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
