"""Capture without weights: a model built on the meta device from its config alone is captured, analysed
and compiled as the loaded one is (``peftc inspect``, ``peftc compile --dry-run``), so a model of any size,
or a directory holding only ``config.json``, can be inspected and dry-compiled."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import peftc
from peftc.cli import main
from peftc.compiler.compiled import compile_prepared, prepare

#: LLaMA-2-7B's configuration
LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                 architectures=["LlamaForCausalLM"])


@pytest.mark.slow
def test_a_config_only_llama2_7b_dry_compiles_to_hf_pefts_trainable_count(tmp_path, capsys):
    LlamaConfig(**LLAMA2_7B).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    spec = tmp_path / "qv.peft"
    spec.write_text("lora q, v r=8\n")
    assert main(["compile", str(spec), "--model", str(tmp_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    with torch.device("meta"):
        hf = get_peft_model(AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA2_7B)),
                            LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = hf.get_nb_trainable_parameters()
    assert (trainable, total) == (4_194_304, 6_742_609_920)
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "qv.peft"]     # nothing written


@pytest.mark.parametrize("spec", ["lora q,v r=4; ia3 down", "quant nf4 base; lora q,v r=4", "quant int8 base",
                                  "prefix tokens=3", "prompt tokens=3", "adapter bottleneck=8"])
def test_a_dry_compile_reports_what_the_real_one_does(spec):
    real = compile_prepared(prepare("tiny-llama"), spec).report().to_dict()
    dry_prepared = prepare("tiny-llama", weights=False)
    assert all(p.is_meta for p in dry_prepared.captured.gm.parameters())
    dry = compile_prepared(dry_prepared, spec).report().to_dict()
    real.pop("timings_s"), dry.pop("timings_s")
    assert dry == real


def test_inspect_reads_no_weights(tmp_path, capsys):
    model = peftc.load_model("tiny-llama")
    model.config.architectures = [type(model).__name__]     # as save_pretrained writes it
    model.config.save_pretrained(tmp_path)                  # config.json only
    assert main(["inspect", "tiny-llama", "--json"]) == 0
    built_in = json.loads(capsys.readouterr().out)
    assert main(["inspect", "--model", str(tmp_path), "--json"]) == 0
    config_only = json.loads(capsys.readouterr().out)
    assert config_only["linears"] == built_in["linears"] and config_only["embed"] == built_in["embed"]
    assert len(config_only["linears"]) == 29


def test_compile_needs_out_or_dry_run(tmp_path, capsys):
    spec = tmp_path / "a.peft"
    spec.write_text("lora q\n")
    assert main(["compile", str(spec), "--model", "tiny-llama"]) == 1
    assert "give --out DIR for the run directory, or --dry-run" in capsys.readouterr().err
