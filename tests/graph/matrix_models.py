"""The architecture matrix's tiny seeded random models, built in code from transformers' config classes
(2 layers, width 32, vocabularies of 64-128), and the inputs each is called with."""
import torch
import transformers as T

VOCAB = 96
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
MOE = dict(DECODER, intermediate_size=48, num_experts_per_tok=2)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _decoders():
    return {
        "LLaMA": lambda: T.LlamaForCausalLM(T.LlamaConfig(rope_parameters=LLAMA3, **DECODER)),
        "Qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER)),
        "Qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=8, **DECODER)),
        # a window of 6 < prefix + sequence: the prefix leaves the window as HF PEFT's cache does
        "Mistral": lambda: T.MistralForCausalLM(T.MistralConfig(sliding_window=6, **DECODER)),
        "Gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(head_dim=8, **DECODER)),
        "Gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=8, sliding_window=6, **DECODER)),
        "Gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
            head_dim=8, sliding_window=6, layer_types=["sliding_attention", "full_attention"], **DECODER)),
        "Phi": lambda: T.PhiForCausalLM(T.PhiConfig(**DECODER)),
        "StableLM": lambda: T.StableLmForCausalLM(T.StableLmConfig(**DECODER)),
        "OLMo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**DECODER)),
        "Cohere": lambda: T.CohereForCausalLM(T.CohereConfig(**DECODER)),
        "Granite": lambda: T.GraniteForCausalLM(T.GraniteConfig(**DECODER)),
        "SmolLM3": lambda: T.SmolLM3ForCausalLM(T.SmolLM3Config(**DECODER)),
        "GPT-J": lambda: T.GPTJForCausalLM(T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                        vocab_size=VOCAB, n_positions=64)),
        "Bloom": lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB)),
        "CodeGen": lambda: T.CodeGenForCausalLM(T.CodeGenConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                                vocab_size=VOCAB, n_positions=64)),
        "GPT-BigCode": lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
            n_embd=32, n_layer=2, n_head=4, multi_query=True, vocab_size=VOCAB, n_positions=64)),
        "Mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=4, **MOE)),
        "Qwen2-MoE": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            moe_intermediate_size=16, num_experts=4, shared_expert_intermediate_size=24, **MOE)),
        "Qwen3-MoE": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
            moe_intermediate_size=16, num_experts=4, head_dim=8, **MOE)),
    }


def _others():
    return {
        "RoBERTa": lambda: T.RobertaModel(T.RobertaConfig(**dict(ENCODER, pad_token_id=1)), add_pooling_layer=False),
        "DeBERTa-v2": lambda: T.DebertaV2Model(T.DebertaV2Config(**ENCODER)),
        "ModernBERT": lambda: T.ModernBertModel(T.ModernBertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=64, pad_token_id=0, global_attn_every_n_layers=2, local_attention=8)),
        "DistilBERT": lambda: T.DistilBertModel(T.DistilBertConfig(
            dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
            pad_token_id=0)),
        "T5": lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0)),
        "BART": lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
        "ViT": lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64, num_labels=3)),
        "Whisper": lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=VOCAB, num_mel_bins=8, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, d_model=32,
            max_source_positions=16, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0)),
    }


BUILDERS = {**_decoders(), **_others()}
ENCODER_DECODERS = ("T5", "BART", "Whisper")
TEXT2TEXT = ("input_ids", "attention_mask", "decoder_input_ids")
#: (the compiled model's inputs, its kind) where they are not a decoder's or an encoder's token inputs
SIGNATURES = {"T5": (TEXT2TEXT, "seq2seq-lm"), "BART": (TEXT2TEXT, "seq2seq-lm"),
              "ViT": (("pixel_values",), "classifier"),
              "Whisper": (("input_features", "decoder_input_ids"), "seq2seq-lm")}


def build(arch: str):
    """A fresh copy of ``arch``'s tiny model: the same seeded weights on every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BUILDERS[arch]().eval()


def inputs(arch: str) -> dict:
    """A batch of 2: token inputs with a left-padded row (9 tokens; the decoder side 6), or pixels, or
    audio features."""
    g = torch.Generator().manual_seed(1)
    if arch == "ViT":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    if arch == "Whisper":                               # 2 × max_source_positions frames of 8 mel bins
        return {"input_features": torch.randn(2, 8, 32, generator=g),
                "decoder_input_ids": torch.randint(3, VOCAB, (2, 6), generator=g)}
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if arch in ENCODER_DECODERS:
        feeds["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 6), generator=g)
    return feeds


def output(model, feeds: dict) -> torch.Tensor:
    """A transformers model's (or HF PEFT's) main output: the logits, or an encoder's last hidden state."""
    with torch.no_grad():
        out = model(**feeds)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
