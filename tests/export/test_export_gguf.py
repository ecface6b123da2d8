"""``peftc export DIR --gguf OUT.gguf``: llama.cpp's format, read back by transformers' own GGUF loader (which
undoes llama.cpp's Q/K permutation and maps its names back) with the merged model's logits."""
import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftc
from conftest import randomize_adapters, token_ids
from numerics import REORDERED, assert_close, assert_differs
from peftc.cli import main
from peftc.export.gguf import export_gguf
from peftc.export.precision import float32_compute
from peftc.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A bf16 LLaMA checkpoint's merged ``lora q, v`` with adapters that move the logits."""
    directory = tmp_path_factory.mktemp("gguf") / "checkpoint"
    load_model("tiny-llama", "bf16").save_pretrained(directory)
    model = peftc.compile(str(directory), "lora q, v r=4", seed=0)
    randomize_adapters(model, seed=3, scale=0.3)
    return model.merge()


def _read_back(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids) if isinstance(model, peftc.CompiledModel) else model(input_ids=ids).logits
    return out.float()


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_transformers_reads_the_gguf_back_with_the_merged_logits(merged, tmp_path, gguf_type):
    result = export_gguf(merged, tmp_path / "m.gguf", gguf_type)
    assert not result.tokenizer
    ids = token_ids(batch=2, seq=9, vocab=merged.config.vocab_size, seed=2)
    # bf16 weights are exact in f16 and f32; transformers computes in float32 as the view does, with the
    # rotary halves permuted back: the same arithmetic in another order at most
    assert_close(_logits(_read_back(result.path), ids), _logits(float32_compute(merged), ids), rel=REORDERED,
                 why="the same weights in float32, through transformers' modules")
    kinds = {t.tensor_type for t in gguf.GGUFReader(str(result.path)).tensors}
    want = gguf.GGMLQuantizationType.F32 if gguf_type == "f32" else gguf.GGMLQuantizationType.F16
    assert want in kinds and kinds <= {want, gguf.GGMLQuantizationType.F32}


def test_q8_0_stores_8_bit_blocks_and_stays_near_the_merge(merged, tmp_path):
    result = export_gguf(merged, tmp_path / "m.gguf", "q8_0")
    assert gguf.GGMLQuantizationType.Q8_0 in {t.tensor_type for t in gguf.GGUFReader(str(result.path)).tensors}
    ids = token_ids(batch=2, seq=9, vocab=merged.config.vocab_size, seed=2)
    expected = _logits(float32_compute(merged), ids)
    got = _logits(_read_back(result.path), ids)
    # each weight within absmax/254 of its block of 32: on tiny-llama the logits moved 1.6% of the largest;
    # 10% leaves a margin of six, and the merged adapter moves them by far more than that (checked below)
    assert_close(got, expected, rel=0.1, why="8-bit blocks of 32 weights")
    base = peftc.compile(load_model("tiny-llama", "bf16"), "")
    assert_differs(expected, _logits(float32_compute(base), ids), rel=0.2, why="the adapter moves the logits")


def test_an_architecture_gguf_cannot_name_is_refused_in_one_line(tmp_path, capsys):
    spec = tmp_path / "lora.peft"
    spec.write_text("lora all-linear r=4\n")
    run = tmp_path / "run"
    assert main(["compile", str(spec), "--model", "tiny-gpt2", "--out", str(run)]) == 0
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "GGUF export names tensors for the LLaMA family" in err and "gpt2" in err, err
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_the_default_model_round_trips_with_its_tokenizer(tmp_path):
    """SmolLM2 comes from a GGUF file: its tokenizer metadata goes into the export, and transformers reads
    the file back as the merged model and the same tokenizer."""
    model = peftc.compile("smollm2-135m", "lora q, v r=8", seed=0)
    randomize_adapters(model, seed=1, scale=0.05)
    merged = model.merge()
    result = export_gguf(merged, tmp_path / "smollm2.gguf", "f32")
    assert result.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="smollm2.gguf")
    text = "The capital of France is"
    assert tokenizer(text).input_ids == load_tokenizer("smollm2-135m")(text).input_ids
    ids = torch.tensor([tokenizer(text).input_ids])
    assert_close(_logits(_read_back(result.path), ids), _logits(merged, ids), rel=REORDERED,
                 why="the same float32 weights, through transformers' modules")
