"""``peftc export DIR --hf OUT``: the merged model as a Hugging Face checkpoint that transformers loads with
the merged model's logits, and that ONNX Runtime GenAI's model builder takes."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftc
from conftest import randomize_adapters, token_ids
from numerics import REORDERED, assert_close, assert_differs, half_reordered
from peftc.cli import main
from peftc.export.hf import TOKENIZER_FILES, export_hf
from peftc.models import load_model, resolve

SPECS = ["lora q, v r=4", "quant nf4 base; lora q, v r=4", "ia3 k, v, down", "lora all-linear r=4; full o"]


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "checkpoint"
    load_model("tiny-llama", "bf16").save_pretrained(directory)
    return directory


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids) if not isinstance(model, peftc.CompiledModel) else model(ids)
    return getattr(out, "logits", out).float()


@pytest.mark.parametrize("spec", SPECS)
def test_transformers_loads_the_merge_with_its_logits(bf16_checkpoint, tmp_path, spec):
    model = peftc.compile(str(bf16_checkpoint), spec, seed=0)
    randomize_adapters(model, seed=2, scale=0.3)
    merged = model.merge()
    result = export_hf(merged, tmp_path / "merged")
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(result.files)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert loaded.dtype == torch.bfloat16
    ids = token_ids(batch=2, seq=10, vocab=merged.config.vocab_size, seed=5)
    # the same bf16 weights through transformers' own modules and through the captured graph of them: the
    # same ops (seen equal bit for bit); the bound allows another CPU's kernels a few bf16 eps
    assert_close(_logits(loaded, ids), _logits(merged, ids), rel=half_reordered(torch.bfloat16),
                 why="the same bf16 weights and ops, eager vs captured")
    base = AutoModelForCausalLM.from_pretrained(bf16_checkpoint)
    assert_differs(_logits(loaded, ids), _logits(base, ids), rel=4 * half_reordered(torch.bfloat16),
                   why="the merged adapter moves the logits")


def test_gpt2s_biases_and_tied_head_go_back_under_their_names(tmp_path):
    """tiny-gpt2: Conv1D weights (in × out), biases that bitfit trains, a head tied to the embedding."""
    model = peftc.compile("tiny-gpt2", "bitfit; lora all-linear r=4", seed=0)
    randomize_adapters(model, seed=4, scale=0.3)
    merged = model.merge()
    export_hf(merged, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    ids = token_ids(batch=2, seq=9, vocab=merged.config.vocab_size, seed=6)
    assert_close(_logits(loaded, ids), _logits(merged, ids), rel=REORDERED,
                 why="the same float32 weights, eager vs captured")
    assert_differs(_logits(loaded, ids), _logits(load_model("tiny-gpt2"), ids), rel=100 * REORDERED,
                   why="the merged biases and LoRA move the logits")


def test_a_bias_the_architecture_lacks_is_refused(bf16_checkpoint, tmp_path):
    merged = peftc.compile(str(bf16_checkpoint), "bitfit q", seed=0).merge()
    with pytest.raises(peftc.ExportError, match=r"merged: bitfit at model.layers.0.self_attn.q_proj left .* no place for"):
        export_hf(merged, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_merge_that_keeps_graph_ops_is_refused_and_nothing_is_replaced(bf16_checkpoint, tmp_path, capsys):
    spec = tmp_path / "prefix.peft"
    spec.write_text("prefix tokens=2\n")
    run = tmp_path / "run"
    assert main(["compile", str(spec), "--model", str(bf16_checkpoint), "--out", str(run)]) == 0
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")
    assert main(["export", str(run), "--hf", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "prefix" in err and "stay graph ops after merging" in err and "--onnx" in err, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_a_merged_checkpoint_the_genai_builder_takes(tmp_path):
    """A LLaMA checkpoint with a tokenizer (tiny-llama's weights beside SmolLM2's tokenizer files, which the
    builder needs): the CLI writes a checkpoint with the tokenizer's files; transformers loads it with the
    merged logits; ONNX Runtime GenAI's builder makes its KV-cache model from it, and onnxruntime-genai
    greedy-decodes the tokens transformers' generate() gives on the checkpoint, as it does from peftc's own
    KV-cache export of the same run (``--genai``)."""
    import onnxruntime_genai as og
    source = tmp_path / "tiny"
    peftc.load_model("tiny-llama").save_pretrained(source)
    for file in resolve("smollm2-135m")[1].iterdir():
        if file.name in TOKENIZER_FILES:
            shutil.copyfile(file, source / file.name)
    spec = tmp_path / "lora.peft"
    spec.write_text("lora q, v r=8\n")
    run = tmp_path / "run"
    assert main(["compile", str(spec), "--model", str(source), "--out", str(run), "--seed", "0"]) == 0
    model = peftc.compile(str(source), spec.read_text(), seed=0)
    randomize_adapters(model, seed=1, scale=0.3)
    model.save_adapter(run)
    out = tmp_path / "merged"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 9, 17, 33, 102, 7, 64]])
    merged = model.merge()
    assert_close(_logits(loaded, ids), _logits(merged, ids), rel=REORDERED,
                 why="the same float32 weights through transformers' modules and the captured graph")
    built = tmp_path / "genai"
    done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(out), "-o", str(built),
                           "-p", "fp32", "-e", "cpu"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        expected = loaded.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    ours = tmp_path / "peftc-genai"
    assert main(["export", str(run), "--genai", str(ours)]) == 0
    for directory in (built, ours):
        genai = og.Model(str(directory))
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=ids.shape[1] + 12, min_length=ids.shape[1] + 12, do_sample=False)
        generator = og.Generator(genai, params)
        generator.append_tokens(ids[0].tolist())
        got = []
        while not generator.is_done():
            generator.generate_next_token()
            got.append(generator.get_next_tokens()[0])
        assert got == expected.tolist(), directory.name
