"""Export of a half-precision model: the file computes in float32 from the model's own weights and stores
them in float32 (or float16), and the export makes no float32 copy of the model on the torch side."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from transformers import AutoModelForCausalLM

import peftc
from conftest import randomize_adapters, token_ids
from numerics import assert_close, assert_differs, assert_export_close, ONNX_RUNTIME
from peftc.export.precision import float32_compute
from peftc.export.targets import export_target
from peftc.models import load_model


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A bfloat16 checkpoint and its merged ``lora q, v`` model, with adapters that move the logits."""
    directory = tmp_path_factory.mktemp("bf16") / "checkpoint"
    load_model("tiny-llama", "bf16").save_pretrained(directory)
    model = peftc.compile(str(directory), "lora q, v r=4\n")
    randomize_adapters(model, seed=3, scale=0.5)
    return directory, model.merge()


def _initializer_types(path) -> set[int]:
    model = onnx.load(str(path), load_external_data=False)
    return {init.data_type for init in model.graph.initializer
            if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)}


def _ort_logits(path, ids):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_ids": ids.numpy(),
                                               "attention_mask": np.ones_like(ids.numpy())})[0])


@pytest.mark.slow
def test_a_bf16_merge_exports_float32_equal_to_transformers_on_the_same_weights(bf16_run, tmp_path):
    directory, merged = bf16_run
    assert merged.base_dtype == torch.bfloat16
    result = peftc.export_onnx(merged, tmp_path / "m.onnx")
    assert_export_close(result)
    assert _initializer_types(result.path) == {TensorProto.FLOAT}
    # the oracle: transformers' float32 model holding the merged bfloat16 weights, upcast (exactly)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    state = {name.removeprefix("hf."): t.float() for name, t in merged.graph_module.state_dict().items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in name for name in missing)
    ids = token_ids(batch=2, seq=9, vocab=merged.config.vocab_size, seed=4)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)(input_ids=ids).logits
    got = _ort_logits(result.path, ids)
    assert_close(got, expected, rel=ONNX_RUNTIME, why="the same float32 weights, ONNX Runtime's kernels")
    assert_differs(got, base, rel=100 * ONNX_RUNTIME, why="the merged adapter moves the logits")


@pytest.mark.slow
def test_the_fp16_target_of_a_bf16_merge_stores_float16_weights(bf16_run, tmp_path):
    _, merged = bf16_run
    outcome = export_target(merged, tmp_path / "m16.onnx", "fp16")
    assert_export_close(outcome.export)
    assert _initializer_types(outcome.export.path) == {TensorProto.FLOAT, TensorProto.FLOAT16}
    fp32 = export_target(merged, tmp_path / "m32.onnx", "fp32")
    # half of the large weights' bytes; the graph and the weights under MIN_ELEMENTS stay (0.72 on tiny-llama)
    assert outcome.export.size_bytes < 0.8 * fp32.export.size_bytes


def test_the_float32_view_shares_every_weight_of_the_model(bf16_run):
    _, merged = bf16_run
    view = float32_compute(merged)
    assert view is not merged and float32_compute(view) is view
    ours = {t.data_ptr() for t in merged.graph_module.state_dict().values()}
    theirs = {t.data_ptr() for t in view.graph_module.state_dict().values()}
    assert theirs == ours
    ids = token_ids(batch=1, seq=7, vocab=merged.config.vocab_size)
    with torch.no_grad():
        assert view(ids).dtype == torch.float32 and merged(ids).dtype == torch.bfloat16
