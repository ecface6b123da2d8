from collections import Counter

import pytest

import peftc
from peftc.graph.analysis import analyze
from peftc.graph.capture import capture


def roles_by_path(model):
    sites = analyze(capture(model).gm)
    return sites, {s.path: s.role for s in sites.linears}


def test_llama_roles_come_from_dataflow(tiny):
    sites, roles = roles_by_path(tiny("tiny-llama"))
    assert sites.n_layers == 4 and sites.attention_count == 4
    for layer in range(4):
        prefix = f"model.layers.{layer}"
        assert roles[f"{prefix}.self_attn.q_proj"] == "q"
        assert roles[f"{prefix}.self_attn.k_proj"] == "k"
        assert roles[f"{prefix}.self_attn.v_proj"] == "v"
        assert roles[f"{prefix}.self_attn.o_proj"] == "o"
        assert roles[f"{prefix}.mlp.gate_proj"] == "gate"
        assert roles[f"{prefix}.mlp.up_proj"] == "up"
        assert roles[f"{prefix}.mlp.down_proj"] == "down"
    assert roles["lm_head"] == "head"
    assert sites.embed == "hf.model.embed_tokens.weight"
    k = next(s for s in sites.linears if s.path == "model.layers.0.self_attn.k_proj")
    assert (k.in_features, k.out_features, k.layer) == (64, 32, 0)   # grouped-query attention


def test_gpt2_fused_projection_and_conv1d(tiny):
    sites, roles = roles_by_path(tiny("tiny-gpt2"))
    assert roles["transformer.h.0.attn.c_attn"] == "qkv"
    assert roles["transformer.h.0.attn.c_proj"] == "o"
    assert roles["transformer.h.0.mlp.c_fc"] == "up"
    assert roles["transformer.h.0.mlp.c_proj"] == "down"
    c_attn = next(s for s in sites.linears if s.path == "transformer.h.2.attn.c_attn")
    assert (c_attn.kind, c_attn.in_features, c_attn.out_features, c_attn.layer) == ("conv1d", 64, 192, 2)


def test_bert_encoder_roles(tiny):
    sites, roles = roles_by_path(tiny("tiny-bert"))
    assert Counter(roles.values()) == Counter({"q": 4, "k": 4, "v": 4, "o": 4, "up": 4, "down": 4})
    assert roles["encoder.layer.3.attention.self.value"] == "v"
    assert roles["encoder.layer.3.output.dense"] == "down"


@pytest.mark.parametrize("build", ["llama", "gpt2"])
@pytest.mark.slow
def test_eager_attention_gives_the_same_roles_as_sdpa(build):
    """Explicit matmul-softmax-matmul attention is found like an SDPA call."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    if build == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, attn_implementation="eager")
        model, sdpa = LlamaForCausalLM(config), "tiny-llama"
    else:
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, attn_implementation="eager")
        model, sdpa = GPT2LMHeadModel(config), "tiny-gpt2"
    eager_sites, eager_roles = roles_by_path(model)
    sdpa_sites, sdpa_roles = roles_by_path(peftc.load_model(sdpa))
    assert eager_sites.attention_count == 2
    assert eager_roles == {p: r for p, r in sdpa_roles.items() if not any(f".{i}." in p for i in (2, 3))}
    slices = {s.path: s.slices for s in eager_sites.linears if s.slices}
    assert slices == {s.path: s.slices for s in sdpa_sites.linears if s.slices and s.layer in (0, 1)}
