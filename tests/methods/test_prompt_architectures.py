"""``prompt`` and ``prefix`` on architectures whose embedding or config differs from LLaMA's (their outputs
against HF PEFT are cells of tests/graph/test_matrix.py): Gemma's text init is the embedding module's
output, scaled by √hidden inside it, as HF PEFT's; the files' shapes are read through a config's
``attribute_map`` (DistilBERT names its sizes ``dim``/``n_heads``/``n_layers``), where HF PEFT's own rule
misses them."""
from types import SimpleNamespace

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peft.utils.other import _prepare_prompt_learning_config

import peftc
from peftc.methods.prompt.hf import hf_shapes

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def gemma():
    """A tiny seeded random Gemma CausalLM (the same weights on every call)."""
    import transformers as T
    return _seeded(lambda: T.GemmaForCausalLM(T.GemmaConfig(**SIZES)))


# ── Gemma: the prompt's text init after the embedding module's √hidden scale ───────────────────────
def _directory_with_tokenizer(model, directory):
    """``model`` saved with a small word-level tokenizer that adds a BOS token, as Gemma's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "classify", "the", "review", ":"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return str(directory)


@pytest.mark.slow
def test_gemma_init_text_is_the_embedding_modules_output_as_in_hf_peft(tmp_path):
    """HF PEFT's TEXT init calls ``word_embeddings(ids)``: Gemma's rows come out scaled by √64 = 8."""
    ref = _directory_with_tokenizer(gemma(), tmp_path / "model")
    text = "classify the review :"
    model = peftc.compile(ref, f'prompt tokens=7 init="{text}"')
    hf = get_peft_model(peftc.load_model(ref), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=ref))
    ours = model.adapter_parameters()["prompt_encoder.embedding"]
    assert torch.equal(ours, hf.prompt_encoder["default"].embedding.weight)
    rows = peftc.load_model(ref).model.embed_tokens.weight[[1, 4, 5, 6, 7, 1, 4]]   # <bos> + 4 words, to 7
    assert torch.equal(ours, rows * 8.0)                    # a power of two: the product is exact


# ── hf_shapes against HF PEFT's own rule ────────────────────────────────────────────────────────────
def _configs():
    import transformers as T
    return {
        "llama": T.LlamaConfig(**SIZES),
        "gemma3-multimodal": T.Gemma3Config(text_config=SIZES),
        "gpt2": T.GPT2Config(n_embd=64, n_layer=3, n_head=4),
        "bert": T.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
        "opt": T.OPTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
        "bloom": T.BloomConfig(hidden_size=64, n_layer=3, n_head=4),
        "gpt-bigcode": T.GPTBigCodeConfig(n_embd=64, n_layer=3, n_head=4),
    }


@pytest.mark.parametrize("name", list(_configs()))
@pytest.mark.parametrize("config_cls", [PromptTuningConfig, PrefixTuningConfig])
def test_hf_shapes_equal_hf_peft_where_it_reads_them(name, config_cls):
    config = _configs()[name]
    hf = _prepare_prompt_learning_config(config_cls(task_type="CAUSAL_LM", num_virtual_tokens=2), config)
    ours = hf_shapes(SimpleNamespace(config=config), prefix=config_cls is PrefixTuningConfig)
    assert ours == {"num_layers": hf.num_layers, "token_dim": hf.token_dim,
                    "num_attention_heads": hf.num_attention_heads}


def test_hf_shapes_read_aliased_names_hf_peft_misses():
    """DistilBERT: HF PEFT's dict lookup finds neither the width nor the head count (``dim``, ``n_heads``),
    so a file must hold them; the attributes give them."""
    from transformers import DistilBertConfig
    config = DistilBertConfig(dim=96, n_layers=3, n_heads=6)
    with pytest.raises(ValueError, match="Please specify `token_dim`"):
        _prepare_prompt_learning_config(PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=2),
                                        config)
    for prefix in (False, True):
        assert hf_shapes(SimpleNamespace(config=config), prefix) == {"num_layers": 3, "token_dim": 96,
                                                                     "num_attention_heads": 6}
