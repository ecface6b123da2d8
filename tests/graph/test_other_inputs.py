"""Models whose inputs are not (input_ids, attention_mask), beyond the architecture matrix
(test_matrix.py, where T5, BART, ViT and Whisper are checked against HF PEFT and exported): T5's encoder
alone exports its merged LoRA to ONNX Runtime, and ``attn=self|cross`` picks T5's self- or
cross-attention, equal to HF PEFT."""
import pytest
import torch
import transformers as T
from peft import PeftModel

import peftc
from conftest import randomize_adapters
from numerics import SAME_FUNCTION, assert_close, assert_export_close


def t5():
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0))


def t5_encoder():
    return T.T5EncoderModel(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))


BUILD = {"t5": t5, "t5-encoder": t5_encoder}


def built(name):
    torch.manual_seed(0)
    return BUILD[name]().eval()


def inputs(name):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :2] = 0                                    # a padded row
    if name == "t5-encoder":
        return {"input_ids": torch.randint(0, 64, (3, 9), generator=g), "attention_mask": mask}
    return {"input_ids": torch.randint(0, 64, (3, 9), generator=g), "attention_mask": mask,
            "decoder_input_ids": torch.randint(0, 64, (3, 6), generator=g)}


def hf_outputs(model, feeds):
    with torch.no_grad():
        return model(**feeds).logits


@pytest.mark.slow
def test_t5_encoder_alone_exports_its_merged_lora_to_onnx_runtime(tmp_path):
    model = peftc.compile(built("t5-encoder"), "lora q, v r=4")
    randomize_adapters(model, scale=0.1)
    result = peftc.export_onnx(model.merge(), tmp_path / "t5-encoder.onnx")
    assert_export_close(result)


@pytest.mark.parametrize("name, cross", [("t5", "EncDecAttention")])
@pytest.mark.slow
def test_attn_selects_self_or_cross_attention_and_equals_hf_peft(name, cross, tmp_path):
    """Cross-attention is found from the dataflow (its keys read another input than its queries), not from
    these module names; HF PEFT reaches the same modules through the paths peftc's file lists."""
    model = peftc.compile(built(name), "lora q, v r=4 attn=cross")
    assert len(model.records) == 4 and all(cross in r.key for r in model.records)
    selfish = peftc.compile(built(name), "lora q, v, up r=4 attn=self")
    assert len(selfish.records) == 12 and not any(cross in r.key for r in selfish.records)
    randomize_adapters(model, scale=0.5)
    model.save_hf_peft(tmp_path)
    feeds = inputs(name)
    with torch.no_grad():
        ours = model(**feeds)
    theirs = hf_outputs(PeftModel.from_pretrained(built(name), str(tmp_path)).eval(), feeds)
    assert_close(ours, theirs, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
