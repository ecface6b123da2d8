"""``prefix`` on an encoder-decoder (BART; T5, whose decoder adds a learned relative-position bias that
HF PEFT's cache extends over the prefix keys), against HF PEFT's ``SEQ_2_SEQ_LM`` prefix tuning: HF PEFT
writes the file and peftc reads it, peftc writes it and HF PEFT reads it, and the outputs are the same.
Four decoder layers, so HF PEFT's layout (decoder layer i reads block 2i mod L of its prefix tensor, see
peftc/methods/prefix/seq2seq.py) shows: layers 2 and 3 take layers 0 and 1's prefixes. And HF PEFT's own
encoder-decoder prompt-tuning files (2P rows, as its default writes them) load into peftc."""
import pytest
import torch
import transformers as T
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

import peftc
from conftest import randomize_adapters
from numerics import SAME_FUNCTION, assert_close, assert_differs

TOKENS, LAYERS, WIDTH = 3, 4, 32
CONFIGS = {
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=96, d_model=WIDTH, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=96, d_model=WIDTH, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=4, decoder_start_token_id=0)),
}
DECODER_SELF = {"bart": "model.decoder.layers.{}.self_attn", "t5": "decoder.block.{}.layer.0.SelfAttention"}


def build(arch: str = "bart"):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CONFIGS[arch]().eval()


def bart():
    return build("bart")


def feeds() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                       # a left-padded row
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(3, 96, (2, 6), generator=g)}


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**feeds()).logits


def hf_peft(model, config):
    """HF PEFT's model with its prompt encoder at N(0, 1), as a trained one would be far from zero."""
    hf = get_peft_model(model, config)
    with torch.no_grad():
        for param in hf.prompt_encoder.parameters():
            param.normal_(generator=torch.Generator().manual_seed(2))
    return hf.eval()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_hf_pefts_file_gives_hf_pefts_outputs_both_ways(arch, tmp_path):
    hf = hf_peft(build(arch), PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=TOKENS))
    expected = hf_logits(hf)
    assert_differs(expected, hf_logits(build(arch)), rel=10 * SAME_FUNCTION, why="the prefixes move the logits")
    hf.save_pretrained(tmp_path / "hf")

    model = peftc.compile(build(arch), f"prefix tokens={TOKENS}", seed=0)
    prefixed = [r.site.path for r in model.records]
    assert prefixed == [DECODER_SELF[arch].format(i) for i in range(LAYERS)]
    # the decoder's 4 layers read 2 blocks: peftc trains 2 (key, value) pairs, as HF PEFT's forward uses
    assert sum(p.numel() for p in model.adapter_parameters().values()) == 2 * 2 * TOKENS * WIDTH
    model.load_adapter(tmp_path / "hf")
    with torch.no_grad():
        ours = model(**feeds())
    assert_close(ours, expected, rel=SAME_FUNCTION, why="the same attention over cached prefixes, summed in "
                                                        "another order")
    model.save_hf_peft(tmp_path / "ours")
    back = PeftModel.from_pretrained(build(arch), str(tmp_path / "ours")).eval()
    assert_close(hf_logits(back), expected, rel=SAME_FUNCTION, why="the same prefixes read back")
    with torch.no_grad():
        loaded = peftc.load_hf_peft(build(arch), tmp_path / "hf")(**feeds())
    assert_close(loaded, expected, rel=SAME_FUNCTION, why="the spec read from HF PEFT's config")


def test_hf_pefts_default_prompt_file_loads(tmp_path):
    """HF PEFT's SEQ_2_SEQ_LM prompt tuning learns 2P rows (num_transformer_submodules 2) and reads the
    first P, before the encoder's input."""
    hf = hf_peft(bart(), PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=TOKENS))
    assert hf.peft_config["default"].num_transformer_submodules == 2
    expected = hf_logits(hf)
    assert_differs(expected, hf_logits(bart()), rel=10 * SAME_FUNCTION, why="the prompt moves the logits")
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        ours = peftc.load_hf_peft(bart(), tmp_path)(**feeds())
    assert_close(ours, expected, rel=SAME_FUNCTION, why="the same prompt rows, summed in another order")


@pytest.mark.parametrize("arch, spec", [("bart", f"prefix tokens={TOKENS}"), ("bart", f"prefix tokens={TOKENS} project=8"),
                                        ("t5", f"prefix tokens={TOKENS}")])
def test_peftcs_live_prefixes_equal_hf_peft_and_merge(arch, spec, tmp_path):
    model = peftc.compile(build(arch), spec, seed=0)
    randomize_adapters(model, scale=1.0)
    with torch.no_grad():
        ours = model(**feeds())
    assert_differs(ours, hf_logits(build(arch)), rel=10 * SAME_FUNCTION, why="live prefixes")
    model.save_hf_peft(tmp_path)
    hf = PeftModel.from_pretrained(build(arch), str(tmp_path)).eval()
    assert_close(ours, hf_logits(hf), rel=SAME_FUNCTION, why="HF PEFT's cache, summed in another order")
    merged = model.merge()
    with torch.no_grad():
        assert_close(merged(**feeds()), ours, rel=SAME_FUNCTION, why="the prefix encoder folded once")


def test_layers_are_refused():
    with pytest.raises(peftc.SpecError, match="layers= is not taken on an encoder-decoder"):
        peftc.compile(bart(), "prefix tokens=2 layers=0..1")
