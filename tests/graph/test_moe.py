"""Mixture-of-experts blocks: the router (the linear whose scores a top-k reads) is found by what it feeds,
labelled ``router`` and left out of ``all-linear`` and ``base``; a shared expert's MLP gets gate/up/down
within its block, and its scalar sigmoid gate (Qwen2-MoE) is no other block's down projection."""
import peft
import pytest
import torch
from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

import peftc
from conftest import randomize_adapters, token_ids
from numerics import SAME_FUNCTION, assert_close, assert_differs
from peftc.compiler.compiled import prepare

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             max_position_embeddings=64, num_experts_per_tok=2)


def mixtral():
    return MixtralForCausalLM(MixtralConfig(intermediate_size=96, num_local_experts=4, **SMALL))


def qwen2_moe():
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                              shared_expert_intermediate_size=48, **SMALL))


def qwen3_moe():
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                              head_dim=16, **SMALL))


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


@pytest.mark.parametrize("build", [mixtral, qwen2_moe, qwen3_moe])
def test_routers_are_found_and_nothing_else_is_mislabelled(build):
    sites = prepare(_seeded(build)).sites
    roles = {s.path: s.role for s in sites.linears}
    assert {p for p, r in roles.items() if r == "router"} == {f"model.layers.{i}.mlp.gate" for i in range(2)}
    assert roles["lm_head"] == "head"
    for i in range(2):
        for role in ("q", "k", "v", "o"):
            assert roles[f"model.layers.{i}.self_attn.{role}_proj"] == role
        if build is qwen2_moe:
            for role in ("gate", "up", "down"):
                assert roles[f"model.layers.{i}.mlp.shared_expert.{role}_proj"] == role
            assert roles[f"model.layers.{i}.mlp.shared_expert_gate"] is None


@pytest.mark.parametrize("build", [mixtral, qwen2_moe])
def test_all_linear_and_base_leave_the_routers_out(build):
    model = _seeded(build)
    for spec in ("lora all-linear r=2", "quant nf4 base"):
        compiled = peftc.compile(model, spec, seed=0)
        assert not [r for r in compiled.records if r.site.role == "router"], spec


def test_lora_on_the_router_equals_hf_peft_target_parameters():
    """HF PEFT adapts a router (a module holding a weight that F.linear reads, not an nn.Linear) through
    ``target_parameters``: W + scale · B A, which is LoRA on that linear."""
    model = _seeded(mixtral)
    compiled = peftc.compile(model, "lora router r=4 alpha=8", seed=0)
    randomize_adapters(compiled, seed=1, scale=0.5)
    ids = token_ids(batch=2, seq=7, vocab=128, seed=3)
    with torch.no_grad():
        ours, base = compiled(ids), model(input_ids=ids).logits
    hf = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_parameters=["mlp.gate.weight"]))
    params = compiled.adapter_parameters()
    with torch.no_grad():
        for i in range(2):
            layer = hf.base_model.model.model.layers[i].mlp.gate
            a, b = params[f"model.layers.{i}.mlp.gate.lora_A"], params[f"model.layers.{i}.mlp.gate.lora_B"]
            layer.lora_A["default"].weight.copy_(a.reshape(layer.lora_A["default"].weight.shape))
            layer.lora_B["default"].weight.copy_(b.reshape(layer.lora_B["default"].weight.shape))
        theirs = hf(input_ids=ids).logits
    assert_close(ours, theirs, rel=SAME_FUNCTION, why="HF PEFT's parametrised router weight")
    assert_differs(ours, base, rel=100 * SAME_FUNCTION, why="the router's LoRA changes which experts run")


def test_router_on_a_dense_model_says_what_it_has(tiny):
    with pytest.raises(peftc.SpecError) as info:
        peftc.compile(tiny("tiny-llama"), "lora router")
    message = str(info.value)
    assert "router" in message and "q" in message and "down" in message, message
