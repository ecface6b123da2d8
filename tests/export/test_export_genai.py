"""``peftc export DIR --genai OUT``: a KV-cache ONNX decoder. Its steps give the whole sequence's logits; ONNX
Runtime GenAI loads OUT and greedy-decodes the tokens transformers' ``generate()`` gives on the merged
weights (left-padded batches too); every target and the methods that stay graph ops keep working."""
import json

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import torch
from transformers import (AutoModelForCausalLM, GemmaConfig, GemmaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import peftc
from conftest import randomize_adapters, token_ids
from numerics import REORDERED, assert_close
from peftc.cli import main
from peftc.export.genai import RELATIVE_TOLERANCE, OnnxStep, decode, left_padded
from peftc.export.kvcache import cache_decoder
from peftc.export.hf import hf_from_merged

PROMPTS = [[5, 9, 17, 33, 102, 7, 64], [40, 41, 42], [300, 12, 99, 140, 7]]
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=128,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
#: families beyond the built-ins, saved as checkpoints so that the export's reference is transformers' own
BUILT = {"qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **SMALL)),
         "gemma": lambda: GemmaForCausalLM(GemmaConfig(num_key_value_heads=1, head_dim=16, **SMALL))}


def _merged(spec: str, model="tiny-llama", seed: int = 1):
    compiled = peftc.compile(model, spec, seed=0)
    randomize_adapters(compiled, seed=seed, scale=0.3)
    return compiled, compiled.merge()


def _genai_tokens(path, prompt: list[int], new: int) -> list[int]:
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def _generate(hf, ids: np.ndarray, mask: np.ndarray, new: int, eos: int | None = None) -> list[list[int]]:
    """generate()'s new tokens: exactly ``new`` (as onnxruntime-genai's min_length gives), or with ``eos`` up to
    it, the finished rows padded with it (as peftc's decode loop pads them)."""
    length = dict(min_new_tokens=new, pad_token_id=0) if eos is None else dict(eos_token_id=eos, pad_token_id=eos)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                          max_new_tokens=new, **length)
    return out[:, ids.shape[1]:].tolist()


def test_decoder_steps_give_the_whole_sequence_logits():
    """Prefill in two chunks, then one token a step: every step's logits equal the uncached model's at the
    same positions (tiny-llama has grouped-query attention: 4 heads over 2 key/value heads)."""
    _, merged = _merged("lora q, v r=4")
    decoder = cache_decoder(merged)
    ids = token_ids(batch=2, seq=12, seed=3)
    with torch.no_grad():
        whole = merged(ids)
        past, got, start = decoder.layout.empty(2), [], 0
        for stop in (5, 8, 9, 10, 11, 12):
            out = decoder(ids[:, start:stop], torch.ones(2, stop, dtype=torch.long), *past)
            got.append(out[0])
            past, start = out[1:], stop
    assert past[0].shape == (2, 2, 12, 16)
    assert_close(torch.cat(got, 1), whole, rel=REORDERED, why="the same float32 ops over cached keys and values")


@pytest.mark.slow
def test_genai_generates_what_transformers_generates(tmp_path, capsys):
    """The CLI writes OUT; onnxruntime-genai decodes each prompt as transformers' generate() does on the merged
    weights, and peftc's ONNX Runtime loop decodes a left-padded batch of them the same way. The file's inputs,
    outputs and axes have the names genai_config.json gives them, and ``peftc generate --onnx OUT``
    (onnxruntime-genai, and plain ONNX Runtime) prints the text ``peftc generate RUN`` prints."""
    run = tmp_path / "run"
    (tmp_path / "lora.peft").write_text("lora q, v, down r=4\n")
    assert main(["compile", str(tmp_path / "lora.peft"), "--model", "tiny-llama", "--out", str(run)]) == 0
    compiled = peftc.compile("tiny-llama", "lora q, v, down r=4", seed=0)
    randomize_adapters(compiled, seed=1, scale=0.3)
    compiled.save_adapter(run)
    out = tmp_path / "genai"
    assert main(["export", str(run), "--genai", str(out)]) == 0
    assert {"model.onnx", "genai_config.json", "peftc.json"} <= {p.name for p in out.iterdir()}
    hf = hf_from_merged(compiled.merge())
    for prompt in PROMPTS:
        expected = _generate(hf, np.array([prompt]), np.ones((1, len(prompt)), np.int64), 10)[0]
        assert _genai_tokens(out, prompt, 10) == expected
    ids, mask = left_padded(PROMPTS, 0)
    tokens, _ = decode(OnnxStep(out / "model.onnx"), ids, mask, 10, eos_id=2)
    assert tokens.tolist() == _generate(hf, ids, mask, 10, eos=2)
    _assert_named_as_genai_reads_them(out)
    capsys.readouterr()
    texts = {}
    for name, args in {"torch": [str(run)], "genai": ["--onnx", str(out)],
                       "ort": ["--onnx", str(out), "--runtime", "ort"]}.items():
        assert main(["generate", *args, "--prompt", "hello", "--max-new-tokens", "6"]) == 0
        captured = capsys.readouterr()
        texts[name] = captured.out
        assert "KV cache" in captured.err
    assert texts["genai"] == texts["torch"] == texts["ort"]


def _assert_named_as_genai_reads_them(out):
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    inputs, outputs = {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert inputs["past_key_values.3.value"] == ["batch", 2, "past_sequence", 16]
    assert outputs["logits"] == ["batch", "sequence", 512]
    assert outputs["present.0.key"] == ["batch", 2, "total_sequence", 16]
    assert len(inputs) == 2 + 2 * 4 and len(outputs) == 1 + 2 * 4
    config = json.loads((out / "genai_config.json").read_text())["model"]
    assert config["decoder"]["num_key_value_heads"] == 2 and config["decoder"]["num_hidden_layers"] == 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, build in BUILT.items():
        torch.manual_seed(0)
        out[name] = tmp_path_factory.mktemp(name) / "checkpoint"
        build().save_pretrained(out[name])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-phi3", "qwen2", "gemma", "tiny-opt"])
def test_families_generate_in_genai_what_transformers_generates(tmp_path, checkpoints, family):
    """GPT-2 (learned positions, fused c_attn), Phi-3 (fused qkv), Qwen2 (q/k/v biases), Gemma (one key/value
    head, scaled embedding), OPT (positions counted from the mask):
    ``lora all-linear`` merged and exported; the export's own check compares a left-padded batch with
    transformers' generate(), and onnxruntime-genai decodes each prompt as generate() does."""
    ref = str(checkpoints[family]) if family in checkpoints else family
    _, merged = _merged("lora all-linear r=4", model=ref)
    result = peftc.export_genai(merged, tmp_path / "out")
    assert any("generate()" in line for line in result.checked), result.checked
    hf = hf_from_merged(merged) if family not in checkpoints else _reloaded(checkpoints[family], merged)
    vocab = merged.config.vocab_size
    for prompt in PROMPTS[:2]:
        prompt = [t % vocab for t in prompt]
        expected = _generate(hf, np.array([prompt]), np.ones((1, len(prompt)), np.int64), 8)[0]
        assert _genai_tokens(tmp_path / "out", prompt, 8) == expected


def _reloaded(checkpoint, merged):
    """transformers' model of ``checkpoint`` holding the merged weights."""
    hf = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    state = {k.removeprefix("hf."): v for k, v in merged.graph_module.state_dict().items()}
    hf.load_state_dict(state, strict=False)
    return hf


@pytest.mark.slow
@pytest.mark.parametrize("target,op", [("fp16", None), ("int4", "MatMulNBits"), ("nf4", "MatMulBnb4")])
def test_every_target_decodes_in_genai(tmp_path, target, op):
    """fp16 stores float16 weights; int4/nf4 run ONNX Runtime's quantized matmuls. Each file's cached decoding
    is verified against its own torch model, and onnxruntime-genai decodes what peftc's loop decodes."""
    _, merged = _merged("lora q, v r=4")
    result = peftc.export_genai(merged, tmp_path / target, target)
    assert result.max_rel_diff <= RELATIVE_TOLERANCE
    model = onnx.load(str(tmp_path / target / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if op:
        assert op in ops
    else:
        assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}
    if target == "int4":            # as the builder's CPU int4: int8 activations, and the head quantized too
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        features = sum(merged.graph_module.get_parameter(site.weight).shape[0] for site in merged.sites.linears)
        assert sum(a.i for n in nbits for a in n.attribute if a.name == "N") == features, "every linear in int4"
        assert len(nbits) == len(merged.sites.linears) - 3 * result.layers, "q/k/v and gate/up packed a layer"
        assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {4}
    prompt = PROMPTS[0]
    tokens, _ = decode(OnnxStep(tmp_path / target / "model.onnx"), np.array([prompt]), np.ones((1, 7), np.int64), 8)
    assert _genai_tokens(tmp_path / target, prompt, 8) == tokens[0].tolist()


@pytest.mark.slow
def test_a_bottleneck_adapter_decodes_with_the_cache(tmp_path):
    """A bottleneck adapter stays in every layer: greedy decoding in onnxruntime-genai gives the tokens of the
    compiled model re-run on the whole sequence."""
    compiled, merged = _merged("adapter bottleneck=8")
    peftc.export_genai(merged, tmp_path / "out")
    prompt = PROMPTS[2]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, compiled(ids)[:, -1:].argmax(-1)], 1)
    assert _genai_tokens(tmp_path / "out", prompt, 8) == ids[0, len(prompt):].tolist()


def _tiny_mistral(window: int = 4):
    torch.manual_seed(0)
    config = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=96, vocab_size=128, max_position_embeddings=64, sliding_window=window,
                           head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return MistralForCausalLM(config).eval()


@pytest.mark.slow
def test_a_prompt_leaves_the_window_as_the_uncached_model_does(tmp_path):
    """Under Mistral's window of 4 a soft prompt's positions drop out of the window as the sequence grows (as a
    prefix's do: tests/methods/test_prefix_window.py): the export's check decodes past the window (prompts of
    3 to 11 tokens, 8 new) and compares every step with the uncached model, so a constant past that stayed
    visible would be refused."""
    compiled = peftc.compile(_tiny_mistral(), "prompt tokens=3", seed=0)
    randomize_adapters(compiled, seed=1, scale=1.0)
    result = peftc.export_genai(compiled.merge(), tmp_path / "out")
    assert result.max_rel_diff <= RELATIVE_TOLERANCE


def test_sliding_window_attention_keeps_its_window():
    """Mistral with a window of 4: past the window, the cached decoder still equals the uncached model, whose
    mask drops the keys the window leaves (so a cache that kept every key would differ)."""
    compiled = peftc.compile(_tiny_mistral(), "lora q, v r=4", seed=0)
    randomize_adapters(compiled, seed=1, scale=0.3)
    merged = compiled.merge()
    decoder = cache_decoder(merged)
    ids = token_ids(batch=1, seq=10, vocab=128, seed=4)
    with torch.no_grad():
        whole = merged(ids)
        out = decoder(ids[:, :3], torch.ones(1, 3, dtype=torch.long), *decoder.layout.empty(1))
        steps = [out[0]]
        for t in range(3, 10):
            out = decoder(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), *out[1:])
            steps.append(out[0])
    assert_close(torch.cat(steps, 1), whole, rel=REORDERED, why="the same float32 ops over cached keys and values")


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["prompt tokens=4", "prefix tokens=4"])
def test_prompt_and_prefix_decode_what_hf_peft_generates(tmp_path, spec):
    """A soft prompt's keys and values are computed once and kept in front of the cache, as a prefix's are:
    onnxruntime-genai decodes the tokens of greedy decoding with HF PEFT's model (the same adapter, loaded
    from the files peftc wrote), re-run on the whole sequence each step. (HF PEFT 0.21's own generate() on
    transformers 5.24 gives other tokens than its forward does, with the cache for both methods and without
    it for the prefix; its cacheless generate() of the prompt gives these tokens.)"""
    from peft import PeftModel
    compiled = peftc.compile("tiny-llama", spec, seed=0)
    randomize_adapters(compiled, seed=1, scale=1.0)
    compiled.save_hf_peft(tmp_path / "hf")
    peftc.export_genai(compiled.merge(), tmp_path / "out")
    theirs = PeftModel.from_pretrained(peftc.load_model("tiny-llama"), str(tmp_path / "hf")).eval()
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(8):
                logits = theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
        assert _genai_tokens(tmp_path / "out", prompt, 8) == ids[0, len(prompt):].tolist()
    step = OnnxStep(tmp_path / "out" / "model.onnx")        # the constant past is never returned
    _, present = step(np.array([prompt]), np.ones((1, len(prompt)), np.int64), step.empty(1))
    assert present[0].shape[2] == len(prompt)


@pytest.mark.slow
def test_an_encoder_is_refused_and_the_previous_directory_kept(tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "lora.peft").write_text("lora q, v r=4\n")
    assert main(["compile", str(tmp_path / "lora.peft"), "--model", "tiny-bert", "--out", str(run)]) == 0
    out = tmp_path / "genai"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--genai", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "causal" in err and "encoder" in err and "Traceback" not in err, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
