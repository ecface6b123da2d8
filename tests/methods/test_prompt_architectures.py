"""``prompt`` and ``prefix`` on architectures whose embedding or config differs from LLaMA's, checked
against HF PEFT through peftc's own files: Gemma, Gemma2 and Gemma3 scale the embedding by √hidden inside
the embedding module (the prompt goes after it, as HF PEFT prepends it to ``word_embeddings(input_ids)``);
DistilBERT names its sizes ``dim``/``n_heads``/``n_layers`` and maps the usual names through
``attribute_map``, which the files' shapes must be read through."""
import json
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peft.utils.other import _prepare_prompt_learning_config
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

import peftc
from peftc.methods.prompt.hf import hf_shapes
from conftest import randomize_adapters
from numerics import SAME_FUNCTION, assert_close, assert_differs
from test_prompt import equals_hf_peft_through_its_files, inputs, output

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def gemma(kind: str):
    """A tiny seeded random Gemma / Gemma2 / Gemma3 text CausalLM (the same weights on every call)."""
    import transformers as T
    classes = {"gemma": (T.GemmaConfig, T.GemmaForCausalLM), "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM),
               "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM)}
    config, model = classes[kind]
    return _seeded(lambda: model(config(**SIZES)))


def distilbert():
    from transformers import DistilBertConfig, DistilBertModel
    return _seeded(lambda: DistilBertModel(DistilBertConfig(dim=64, hidden_dim=128, n_layers=4, n_heads=4,
                                                            vocab_size=512, max_position_embeddings=512,
                                                            pad_token_id=0)))


# ── Gemma: the prompt after the embedding module's √hidden scale ─────────────────────────────────────
@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_gemma_prompt_equals_hf_peft_through_its_files(kind, tmp_path):
    """Inserted at the lookup, inside the scaled embedding, the prompt was multiplied by √64 = 8: off from
    HF PEFT by 1.8e-3 (Gemma) and 0.7 (Gemma2, Gemma3) of the largest logit, over SAME_FUNCTION by 60 times
    at the least."""
    model = peftc.compile(gemma(kind), "prompt tokens=4")
    config = equals_hf_peft_through_its_files(model, lambda: gemma(kind), tmp_path)
    assert (config["peft_type"], config["token_dim"], config["num_attention_heads"]) == ("PROMPT_TUNING", 64, 4)


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
    ref = _directory_with_tokenizer(gemma("gemma"), tmp_path / "model")
    text = "classify the review :"
    model = peftc.compile(ref, f'prompt tokens=7 init="{text}"')
    hf = get_peft_model(peftc.load_model(ref), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=ref))
    ours = model.adapter_parameters()["prompt_encoder.embedding"]
    assert torch.equal(ours, hf.prompt_encoder["default"].embedding.weight)
    rows = peftc.load_model(ref).model.embed_tokens.weight[[1, 4, 5, 6, 7, 1, 4]]   # <bos> + 4 words, to 7
    assert torch.equal(ours, rows * 8.0)                    # a power of two: the product is exact


# ── DistilBERT: sizes read through attribute_map ────────────────────────────────────────────────────
def test_distilbert_prompt_file_loads_in_hf_peft_and_equals_it(tmp_path):
    model = peftc.compile(distilbert(), "prompt tokens=4")
    config = equals_hf_peft_through_its_files(model, distilbert, tmp_path)
    assert (config["num_layers"], config["token_dim"], config["num_attention_heads"]) == (4, 64, 4)


REFERENCE = "peftc_test_prefix_reference"


def _prefixed_reference(prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """DistilBERT whose layer l attends over ``prefixes[l]`` (keys, values: batch × heads × P × head_dim)
    before its own keys and values, every prefix column visible to every query: what HF PEFT's
    past_key_values would mean if DistilBERT read them."""
    model = distilbert()
    by_module = {model.transformer.layer[i].attention: kv for i, kv in prefixes.items()}

    def attention(module, query, key, value, attention_mask, **kwargs):
        pk, pv = by_module[module]
        key, value = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
        if attention_mask is not None:
            fill = torch.ones if attention_mask.dtype == torch.bool else torch.zeros
            visible = fill(*attention_mask.shape[:-1], pk.shape[2], dtype=attention_mask.dtype)
            attention_mask = torch.cat([visible, attention_mask], -1)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(REFERENCE, attention)
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)
    model.set_attn_implementation(REFERENCE)
    return model


def test_distilbert_prefix_file_loads_in_hf_peft_and_equals_its_prefixes(tmp_path):
    """HF PEFT loads the file, but cannot run prefix tuning on DistilBERT (the model takes no
    past_key_values, so HF PEFT's lengthened mask meets unlengthened keys); the reference is DistilBERT
    attending over the prefixes HF PEFT reads from the file (its get_prompt), with the positions after them
    starting at P, as HF PEFT's BERT does."""
    tokens = 3
    model = peftc.compile(distilbert(), f"prefix tokens={tokens}")
    randomize_adapters(model, scale=1.0)
    model.save_hf_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["num_layers"], config["token_dim"], config["num_attention_heads"]) == (4, 64, 4)
    hf = PeftModel.from_pretrained(distilbert(), str(tmp_path)).eval()
    ids, mask = inputs()
    cache = hf.get_prompt(batch_size=ids.shape[0])
    reference = _prefixed_reference({i: (layer.keys, layer.values) for i, layer in enumerate(cache.layers)})
    positions = torch.arange(tokens, tokens + ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        ours = model(ids, mask)
        want = reference(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    assert_differs(ours, output(distilbert(), ids, mask), rel=1e-2, why="live adapters")
    assert_close(ours, want, rel=SAME_FUNCTION, why="an explicit concatenation of the prefixes sums in another order")


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
