"""``--dtype`` end to end: a bfloat16 checkpoint loads as bfloat16 by default, compile records the dtype in
the run directory's manifest, and the commands that reload the directory (explain, eval, generate: rundir.load_run; export)
rebuild the model the same way."""
import json

import pytest
import torch

import peftc
from peftc.cli import main
from peftc.models import load_model
from peftc.rundir import load_run


@pytest.fixture
def bf16_checkpoint(tmp_path):
    directory = tmp_path / "checkpoint"
    load_model("tiny-llama", "bf16").save_pretrained(directory)
    return directory


def test_load_model_keeps_the_checkpoints_dtype_unless_told(bf16_checkpoint):
    assert load_model(str(bf16_checkpoint)).dtype == torch.bfloat16
    assert load_model(str(bf16_checkpoint), "fp32").dtype == torch.float32
    assert load_model("tiny-llama").dtype == torch.float32
    assert load_model("tiny-llama", "fp16").dtype == torch.float16
    with pytest.raises(peftc.ModelError, match="unknown dtype 'bf17'; choose one of auto, bf16, fp16, fp32"):
        load_model("tiny-llama", "bf17")


@pytest.mark.slow
def test_compile_records_the_dtype_and_the_directory_reloads_in_it(bf16_checkpoint, tmp_path, capsys):
    spec = tmp_path / "lora.peft"
    spec.write_text("lora q,v r=4\n")
    out = tmp_path / "run"
    assert main(["compile", str(spec), "--model", str(bf16_checkpoint), "--out", str(out)]) == 0
    manifest = json.loads((out / "peftc.json").read_text())
    assert (manifest["dtype"], manifest["autocast_adapter_dtype"]) == ("bf16", True)
    model = load_run(out, manifest, str(bf16_checkpoint))
    assert model.base_dtype == torch.bfloat16
    assert {p.dtype for p in model.adapter_parameters().values()} == {torch.float32}
    assert main(["explain", str(out)]) == 0
    # export reloads the run in bf16 and computes its float32 (or fp16, nf4, int4) target from those weights
    assert main(["export", str(out), "--onnx", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()

    out16 = tmp_path / "run16"
    assert main(["compile", str(spec), "--model", str(bf16_checkpoint), "--out", str(out16), "--dtype", "fp16",
                 "--no-autocast-adapter-dtype"]) == 0
    manifest = json.loads((out16 / "peftc.json").read_text())
    assert (manifest["dtype"], manifest["autocast_adapter_dtype"]) == ("fp16", False)
    model = load_run(out16, manifest, str(bf16_checkpoint))
    assert {p.dtype for p in model.adapter_parameters().values()} == {torch.float16}


def test_a_bad_dtype_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "tiny-llama", "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
