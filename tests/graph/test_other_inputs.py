"""Models whose inputs are not (input_ids, attention_mask): encoder-decoders (T5, BART), a vision
classifier (ViT) and speech (Whisper) are captured with their own signature, and LoRA and IA3 on them (and a soft prompt on the
encoder-decoders' encoder) equal HF PEFT loading peftc's files; merged, they export to ONNX Runtime."""
import pytest
import torch
import transformers as T
from peft import PeftModel

import peftc
from conftest import randomize_adapters
from numerics import SAME_FUNCTION, assert_close, assert_differs, assert_export_close


def t5():
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0))


def bart():
    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))


def vit():
    return T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, num_labels=3))


def whisper():
    return T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=64, num_mel_bins=8, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, d_model=32, max_source_positions=16,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0))


def t5_encoder():
    return T.T5EncoderModel(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))


BUILD = {"t5": t5, "bart": bart, "vit": vit, "whisper": whisper, "t5-encoder": t5_encoder}
TEXT2TEXT = ("input_ids", "attention_mask", "decoder_input_ids")
SIGNATURES = {"t5": TEXT2TEXT, "bart": TEXT2TEXT, "vit": ("pixel_values",),
              "whisper": ("input_features", "decoder_input_ids")}
KINDS = {"t5": "seq2seq-lm", "bart": "seq2seq-lm", "vit": "classifier", "whisper": "seq2seq-lm"}


def built(name):
    torch.manual_seed(0)
    return BUILD[name]().eval()


def inputs(name):
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g)}
    if name == "whisper":                              # 2 × max_source_positions frames of 8 mel bins
        return {"input_features": torch.randn(3, 8, 32, generator=g),
                "decoder_input_ids": torch.randint(0, 64, (3, 6), generator=g)}
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :2] = 0                                    # a padded row
    if name == "t5-encoder":
        return {"input_ids": torch.randint(0, 64, (3, 9), generator=g), "attention_mask": mask}
    return {"input_ids": torch.randint(0, 64, (3, 9), generator=g), "attention_mask": mask,
            "decoder_input_ids": torch.randint(0, 64, (3, 6), generator=g)}


def hf_outputs(model, feeds):
    with torch.no_grad():
        return model(**feeds).logits


@pytest.mark.parametrize("name, spec", [(name, spec) for name in ("t5", "bart", "vit")
                                        for spec in ("lora q, v r=4 alpha=8", "ia3 k, v, down")]
                         + [("t5", "prompt tokens=4"), ("bart", "prompt tokens=4"), ("whisper", "lora q, v r=4")])
@pytest.mark.slow
def test_lora_and_ia3_equal_hf_peft_through_its_files(name, spec, tmp_path):
    model = peftc.compile(built(name), spec)
    assert model.signature.names == SIGNATURES[name] and model.kind == KINDS[name]
    randomize_adapters(model, scale=0.5)
    model.save_hf_peft(tmp_path)
    feeds = inputs(name)
    with torch.no_grad():
        ours = model(**feeds)
    theirs = hf_outputs(PeftModel.from_pretrained(built(name), str(tmp_path)).eval(), feeds)
    assert_differs(ours, hf_outputs(built(name), feeds), rel=1e-3, why="live adapters")
    assert_close(ours, theirs, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
    with torch.no_grad():
        assert_close(model.merge()(**feeds), ours, rel=SAME_FUNCTION, why="a merged weight: one rounding")


@pytest.mark.parametrize("name", ["t5", "bart", "vit", "whisper", "t5-encoder"])
@pytest.mark.slow
def test_merged_models_export_to_onnx_runtime(name, tmp_path):
    model = peftc.compile(built(name), "lora q, v r=4")
    randomize_adapters(model, scale=0.1)
    result = peftc.export_onnx(model.merge(), tmp_path / f"{name}.onnx")
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
