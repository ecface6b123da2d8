"""``prompt``: a soft prompt prepended after the token embedding, checked against HF PEFT's prompt tuning
(its files, its outputs on the real positions, its parameter counts, its text initialisation)."""
import json

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model

import peftc
from peftc.compiler.compiled import op_histogram
from conftest import randomize_adapters, token_ids
from numerics import SAME_FUNCTION, assert_close, assert_differs, assert_export_close


def inputs(batch=2, seq=9):
    ids = token_ids(batch, seq)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                       # a left-padded row
    return ids, mask


def output(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def equals_hf_peft_through_its_files(model, fresh, directory, tokens: int = 4) -> dict:
    """Give ``model``'s soft prompt live values, save it as HF PEFT's files in ``directory``, load them onto
    ``fresh()`` (the base model, unadapted) and check that HF PEFT's last T positions equal peftc's output,
    which the prompt moves. Returns the saved adapter config."""
    randomize_adapters(model, scale=1.0)
    model.save_hf_peft(directory)
    ids, mask = inputs()
    with torch.no_grad():
        ours = model(ids, mask)
    base = output(fresh(), ids, mask)
    assert ours.shape == base.shape
    assert_differs(ours, base, rel=1e-2, why="live adapters")
    theirs = output(PeftModel.from_pretrained(fresh(), str(directory)).eval(), ids, mask)
    assert theirs.shape[1] == ids.shape[1] + tokens
    assert_close(ours, theirs[:, tokens:], rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
    return json.loads((directory / "adapter_config.json").read_text())


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-bert"])
def test_equals_hf_peft_on_the_real_positions(ref, tiny, tmp_path):
    """HF PEFT returns P + T positions; peftc keeps the model's contract (T positions), equal to HF PEFT's
    last T. LLaMA has rotary positions, GPT-2 learned ones, OPT positions from the mask's cumsum, BERT is
    an encoder (last hidden state)."""
    model = peftc.compile(tiny(ref), "prompt tokens=4")
    config = equals_hf_peft_through_its_files(model, lambda: peftc.load_model(ref), tmp_path)
    assert (config["peft_type"], config["num_virtual_tokens"], config["token_dim"]) == ("PROMPT_TUNING", 4, 64)


@pytest.mark.slow
def test_loads_what_hf_peft_wrote(tmp_path):
    torch.manual_seed(0)
    hf = get_peft_model(peftc.load_model("tiny-llama"), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=6))
    hf.save_pretrained(str(tmp_path))
    hf.eval()
    model = peftc.load_hf_peft(peftc.load_model("tiny-llama"), tmp_path)
    assert model.spec.format() == "prompt tokens=6\n"
    ids, mask = inputs()
    with torch.no_grad():
        ours = model(ids, mask)
    assert_close(ours, output(hf, ids, mask)[:, 6:], rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.slow
def test_trainable_count_equals_hf_peft(ref):
    report = peftc.compile(peftc.load_model(ref), "prompt tokens=8").report()
    hf = get_peft_model(peftc.load_model(ref), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    assert (report.trainable, report.total) == hf.get_nb_trainable_parameters()
    assert report.trainable == 8 * 64


def test_gradients_reach_exactly_the_prompt_and_the_graph_is_tagged(tiny):
    model = peftc.compile(tiny("tiny-llama"), "prompt tokens=3")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"graph_module.peftc_prompt_0.embedding"}
    assert list(model.adapter_parameters()) == ["prompt_encoder.embedding"]
    model.train()
    model(*inputs()).pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    assert model.adapter_parameters()["prompt_encoder.embedding"].grad.abs().min() > 0
    assert "[prompt @ <spec>:1:1]" in model.dump_graph()
    # merge keeps the prompt as graph ops (nothing to fold)
    merged = model.merge()
    assert op_histogram(merged.graph_module) == op_histogram(model.graph_module)


def _model_with_tokenizer(directory):
    """tiny-llama saved with a small word-level tokenizer that adds a BOS token, as LLaMA's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>", "classify", "the", "review", ":", "positive", "negative"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    peftc.load_model("tiny-llama").save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


@pytest.mark.slow
def test_init_text_equals_hf_peft_text_init(tmp_path):
    ref = _model_with_tokenizer(tmp_path / "model")
    text = "classify the review :"
    model = peftc.compile(ref, f'prompt tokens=7 init="{text}"')
    hf = get_peft_model(peftc.load_model(ref), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=ref))
    ours = model.adapter_parameters()["prompt_encoder.embedding"]
    assert torch.equal(ours, hf.prompt_encoder["default"].embedding.weight)
    embed = peftc.load_model(ref).model.embed_tokens.weight
    assert torch.equal(ours, embed[[1, 3, 4, 5, 6, 1, 3]])        # <s> + 4 words, repeated to 7
    model.save_hf_peft(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["prompt_tuning_init"], config["prompt_tuning_init_text"]) == ("TEXT", text)


def test_init_text_without_a_tokenizer_is_an_error(tiny):
    with pytest.raises(peftc.SpecError) as err:
        peftc.compile(tiny("tiny-llama"), 'lora q r=2\nprompt tokens=4 init="Classify:"')
    message = str(err.value)
    assert "init text needs the model's tokenizer" in message and "tiny-llama" in message
    assert (err.value.line, err.value.column) == (2, 17)


@pytest.mark.slow
def test_onnx_export_runs_in_onnx_runtime(tiny, tmp_path):
    """tiny-llama's grouped-query attention reshapes along the lengthened sequence (T + P) during export."""
    model = peftc.compile(tiny("tiny-llama"), "prompt tokens=5", seed=0)
    result = peftc.export_onnx(model.merge(), tmp_path / "prompt.onnx")
    assert_export_close(result)


def test_onnx_export_of_an_encoder_with_a_position_buffer(tiny, tmp_path):
    """BERT slices its position ids from a 512-entry buffer: the export's longest input is 512 - P."""
    model = peftc.compile(tiny("tiny-bert"), "prompt tokens=3", seed=0)
    result = peftc.export_onnx(model, tmp_path / "bert.onnx")
    assert_export_close(result)
