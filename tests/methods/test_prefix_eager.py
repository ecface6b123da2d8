"""``prefix`` on attention spelt out in aten ops (transformers' eager attention: Gemma2's default, any model
with ``attn_implementation="eager"``, Bloom's with ALiBi): ``matmul(softmax(f(q·kᵀ) + mask), v)`` gets the
prefixes in k and v and the columns in the mask (and in ALiBi's bias), as an SDPA call does. Checked
against HF PEFT through peftc's own files; attention of another form (DeBERTa-v2's relative-position
scores) is refused with the attention named."""
import pytest
import torch
import transformers as T
from peft import PeftModel

import peftc
from conftest import randomize_adapters, token_ids
from numerics import REORDERED, SAME_FUNCTION, assert_close, assert_differs

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
MODELS = {
    # Gemma2 runs eager by default: its scores are soft-capped (tanh), layer 0 slides (W = 4), layer 1 not
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(sliding_window=4, **SIZES)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(attn_implementation="eager", **SIZES)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512,
                                                   attn_implementation="eager")),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=512)),
    "deberta-v2": lambda: T.DebertaV2Model(T.DebertaV2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512,
        max_position_embeddings=512)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                            attn_implementation="eager", **SIZES)),
}


def build(kind: str):
    """A tiny seeded random model (the same weights on every call)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MODELS[kind]().eval()


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind, windows", [("gemma2", [4, None]), ("llama", [None, None]),
                                           ("gpt2", [None, None]), ("bloom", [None, None])])
def test_eager_attention_prefix_equals_hf_peft_through_its_files(kind, windows, tmp_path):
    """P = 3, T = 9 with a left-padded row: past Gemma2's window in its sliding layer; LLaMA's rotary and
    GPT-2's learned positions shifted by P, as for SDPA; Bloom has no position ids, its ALiBi bias gains
    the prefix columns (left at 0 they are off from HF PEFT by 4.3e-3 of the largest logit, 140 times the
    bound below)."""
    model = peftc.compile(build(kind), "prefix tokens=3")
    assert all(r.site.node.startswith(("matmul", "bmm")) for r in model.records)  # the spelt-out attentions
    assert [r.window for r in model.records] == windows
    assert bool(model.records[0].shifted) == (kind != "bloom")
    randomize_adapters(model, scale=1.0)
    model.save_hf_peft(tmp_path)
    ids = token_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        ours = model(ids, mask)
    assert_differs(ours, logits(build(kind), ids, mask), rel=1e-2, why="live adapters")
    # SAME_FUNCTION (3e-5 of the largest logit): HF PEFT's cache and modules sum in another order, while the
    # prefixes themselves move these logits by 0.055-1.8 of their largest (the assert_differs above)
    assert_close(ours, logits(PeftModel.from_pretrained(build(kind), str(tmp_path)).eval(), ids, mask),
                 rel=SAME_FUNCTION, why="HF PEFT's cache and modules sum in another order")


def test_project_trains_and_merges_on_eager_attention():
    """``project=``'s MLP feeds the spelt-out attentions (inserted before the first one's scores): gradients
    reach all of it, and merge() folds it into plain prefixes with the same output."""
    model = peftc.compile(build("gemma2"), "prefix tokens=3 project=8", seed=0)
    ids = token_ids(2, 9)
    mask = torch.ones_like(ids)
    model.train()
    model(ids, mask).pow(2).mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in model.adapter_parameters().values())
    model.eval()
    with torch.no_grad():
        assert_close(model.merge()(ids, mask), model(ids, mask), rel=REORDERED,
                     why="the folded MLP's output is the prefix the graph computed, summed in another order")


def test_relative_position_attention_is_refused_naming_it():
    """DeBERTa-v2 adds scores computed from q and k with relative positions: no prefix position has one."""
    with pytest.raises(peftc.SpecError, match="prefix cannot rewrite the attention at "
                                              "encoder.layer.0.attention.self:") as err:
        peftc.compile(build("deberta-v2"), "prefix tokens=3")
    assert (err.value.line, err.value.column) == (1, 1)


def test_a_routers_softmax_is_not_taken_for_an_attention():
    """Mixtral's router softmax goes to a top-k, not into a matmul: its two eager attentions are rewritten."""
    model = peftc.compile(build("mixtral"), "prefix tokens=3")
    assert [r.site.path for r in model.records] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
