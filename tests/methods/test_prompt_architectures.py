"""``prompt`` on architectures whose embedding differs from LLaMA's, checked against HF PEFT through
peftc's own files: Gemma, Gemma2 and Gemma3 scale the embedding by √hidden inside the embedding module (the
prompt goes after it, as HF PEFT prepends it to ``word_embeddings(input_ids)``)."""
import json

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, get_peft_model

import peftc
from conftest import randomize_adapters
from numerics import SAME_FUNCTION, assert_close, assert_differs
from test_prompt import inputs, output

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


# ── Gemma: the prompt after the embedding module's √hidden scale ─────────────────────────────────────
@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_gemma_prompt_equals_hf_peft_through_its_files(kind, tmp_path):
    """Inserted at the lookup, inside the scaled embedding, the prompt was multiplied by √64 = 8: off from
    HF PEFT by 1.8e-3 (Gemma) and 0.7 (Gemma2, Gemma3) of the largest logit, over SAME_FUNCTION by 60 times
    at the least."""
    model = peftc.compile(gemma(kind), "prompt tokens=4")
    randomize_adapters(model, scale=1.0)
    model.save_hf_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["token_dim"], config["num_attention_heads"]) == ("PROMPT_TUNING", 64, 4)
    ids, mask = inputs()
    with torch.no_grad():
        ours = model(ids, mask)
    assert_differs(ours, output(gemma(kind), ids, mask), rel=1e-2, why="live adapters")
    hf = PeftModel.from_pretrained(gemma(kind), str(tmp_path)).eval()
    theirs = output(hf, ids, mask)
    assert theirs.shape[1] == ids.shape[1] + 4
    assert_close(ours, theirs[:, 4:], rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")


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
