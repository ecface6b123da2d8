"""Mixture-of-experts blocks: the router (the linear whose scores a top-k reads) is found by what it feeds,
labelled ``router`` and left out of ``all-linear`` and ``base``; a shared expert's MLP gets gate/up/down
within its block, and its scalar sigmoid gate (Qwen2-MoE) is no other block's down projection.

``lora experts``: a LoRA per expert on the stacked expert weights (transformers 5's ``mlp.experts.gate_up_proj``
and ``down_proj``), equal to HF PEFT's ``target_parameters`` LoRA through its files both ways, merged into
the stacked weights, and refused clearly where it cannot apply."""
import functools

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


BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IDS = token_ids(batch=2, seq=7, vocab=128, seed=3)


@functools.lru_cache(maxsize=None)
def _shared(build):
    """One model per builder for peftc's side (compiling never changes it, and its capture is then cached);
    HF PEFT, which wraps the modules of the model it is given, always gets a fresh ``_seeded(build)``."""
    return _seeded(build)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def _hf_factors(hf) -> dict[str, tuple]:
    """HF PEFT's (lora_A, lora_B) shapes by the parameter each ParamWrapper adapts."""
    out = {}
    for name, module in hf.named_modules():
        if type(module).__name__ == "ParamWrapper":
            path = name.replace("base_model.model.", "").replace(".base_layer", "")
            out[f"{path}.{module.parameter_name}"] = (tuple(module.lora_A["default"].weight.shape),
                                                     tuple(module.lora_B["default"].weight.shape))
    return out


def _check_expert_sites(model, sites) -> None:
    config = model.config
    hidden, inner = config.hidden_size, getattr(config, "moe_intermediate_size", config.intermediate_size)
    shapes = {s.path: (s.experts, s.out_features, s.in_features) for s in sites.experts}
    assert shapes == {f"model.layers.{i}.mlp.experts.{name}": shape for i in range(2) for name, shape in
                      (("gate_up_proj", (4, 2 * inner, hidden)), ("down_proj", (4, hidden, inner)))}
    assert {s.role for s in sites.experts} == {"experts"} and "experts" not in {s.role for s in sites.linears}


@pytest.mark.parametrize("build", [mixtral, qwen2_moe, qwen3_moe])
def test_lora_experts_equals_hf_peft_through_its_files_both_ways(build, tmp_path):
    """The experts are every block's two stacked weights (E × out × in), never in all-linear; ``lora experts``
    starts as the base model, and its files and HF PEFT's load into each other with equal logits."""
    model = _shared(build)
    base = _logits(model)
    _check_expert_sites(model, prepare(model).sites)
    linears = peftc.compile(model, "lora all-linear r=2", seed=0)
    assert linears.records and not [r for r in linears.records if r.site.kind == "experts"]
    # HF PEFT 0.21's all-linear maps transformers 4's names (w1/w2/w3, gate) onto the routers and stacked
    # weights for Mixtral and Qwen3-MoE only (what docs/methods.md says); on Qwen2-MoE it adapts neither.
    # Its file, target_parameters and gate_up_proj's doubled rank included, loads into peftc
    hf_all = peft.get_peft_model(_seeded(build), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                 init_lora_weights=False))
    wrapped = {m.parameter_name for m in hf_all.modules() if type(m).__name__ == "ParamWrapper"}
    assert wrapped == ({"weight", "gate_up_proj", "down_proj"} if build in (mixtral, qwen3_moe) else set())
    hf_all.save_pretrained(tmp_path / "all-linear")
    assert_close(peftc.load_hf_peft(model, tmp_path / "all-linear")(IDS), _logits(hf_all), rel=SAME_FUNCTION,
                 why="HF PEFT's all-linear file read into peftc's spec")
    compiled = peftc.compile(model, "lora experts r=4 alpha=8", seed=0)
    fresh = compiled(IDS)
    assert_close(fresh, base, rel=SAME_FUNCTION, why="B starts at zero, as HF PEFT's")
    fresh.pow(2).mean().backward()      # trainable: every expert's B gets a gradient through the weight
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in compiled.adapter_parameters().items()
               if n.endswith("lora_B"))
    randomize_adapters(compiled, seed=1, scale=0.2)
    ours = compiled(IDS).detach()
    compiled.save_hf_peft(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_seeded(build), tmp_path / "ours")
    params = compiled.adapter_parameters()
    assert _hf_factors(theirs) == {p.rsplit(".", 1)[0]: (tuple(params[f"{p.rsplit('.', 1)[0]}.lora_A"].shape),
                                                        tuple(params[f"{p.rsplit('.', 1)[0]}.lora_B"].shape))
                                   for p in params if p.endswith("lora_A")}
    assert_close(ours, _logits(theirs), rel=SAME_FUNCTION, why="HF PEFT's baddbmm(W, B, A) on the same weights")
    assert_differs(ours, base, rel=100 * SAME_FUNCTION, why="the experts' LoRA changes what each expert computes")

    hf = peft.get_peft_model(_seeded(build), peft.LoraConfig(r=2, lora_alpha=5, target_parameters=BOTH,
                                                             init_lora_weights=False))   # B non-zero too
    expected = _logits(hf)
    hf.save_pretrained(tmp_path / "theirs")
    assert_differs(expected, base, rel=100 * SAME_FUNCTION, why="HF PEFT's random-initialised LoRA")
    loaded = peftc.load_hf_peft(model, tmp_path / "theirs")
    assert [r.site.path for r in loaded.records] == [s.path for s in loaded.sites.experts]
    assert_close(loaded(IDS), expected, rel=SAME_FUNCTION, why="HF PEFT's files read into peftc's spec")
    again = peftc.compile(model, "lora experts r=2 alpha=5", seed=0).load_adapter(tmp_path / "theirs")
    assert_close(again(IDS), expected, rel=SAME_FUNCTION, why="the same files into a spec written by hand")


def test_one_stacked_weight_and_the_routers_with_their_own_ranks_round_trip(tmp_path):
    """One adapted parameter of an experts module has no ``base_layer`` in HF PEFT's keys (of two, the one
    registered first has one); rank_pattern matches a parameter's path; a router named by target_parameters
    (``mlp.gate.weight``) is the router's LoRA. Both ways through the files."""
    model = _shared(mixtral)
    spec = 'lora "model.layers.*.mlp.experts.down_proj" r=3 alpha=6 rslora=true\nlora router r=2 alpha=4 rslora=true'
    compiled = peftc.compile(model, spec, seed=0)
    randomize_adapters(compiled, seed=2, scale=0.2)
    compiled.save_hf_peft(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_seeded(mixtral), tmp_path / "ours")
    assert set(_hf_factors(theirs)) == {f"model.layers.{i}.{p}" for i in range(2)
                                        for p in ("mlp.experts.down_proj", "mlp.gate.weight")}
    assert_close(compiled(IDS), _logits(theirs), rel=SAME_FUNCTION, why="HF PEFT's baddbmm on the same weights")

    hf = peft.get_peft_model(_seeded(mixtral), peft.LoraConfig(
        r=2, lora_alpha=4, use_rslora=True, target_parameters=["mlp.experts.down_proj", "mlp.gate.weight"],
        rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 6}, init_lora_weights=False))
    expected = _logits(hf)
    hf.save_pretrained(tmp_path / "theirs")
    loaded = peftc.load_hf_peft(model, tmp_path / "theirs")
    assert sorted((r.site.path, r.r, r.alpha) for r in loaded.records) == sorted(
        (f"model.layers.{i}.{p}", r, a) for i in range(2) for p, r, a in (("mlp.experts.down_proj", 3, 6.0),
                                                                         ("mlp.gate", 2, 4.0)))
    assert_close(loaded(IDS), expected, rel=SAME_FUNCTION, why="HF PEFT's files read into peftc's spec")


def test_merge_folds_the_experts_lora_into_the_stacked_weights():
    model = _shared(qwen2_moe)
    compiled = peftc.compile(model, "lora experts, q, v r=4 alpha=8", seed=0)
    randomize_adapters(compiled, seed=1, scale=0.2)
    merged = compiled.merge()
    assert not merged.records and len(merged.folded) == len(compiled.records)
    ops = {n.target for n in merged.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.baddbmm.default not in ops
    weight = "hf.model.layers.0.mlp.experts.down_proj"
    delta = merged.graph_module.get_parameter(weight) - compiled.graph_module.get_parameter(weight)
    record = next(r for r in compiled.records if r.key == "model.layers.0.mlp.experts.down_proj")
    assert_close(delta, record.delta(compiled.graph_module), rel=SAME_FUNCTION, why="W + s·B_e A_e, rounded once")
    # the merged weight rounds W + s·B_e·A_e once where the unmerged graph adds it on every call: the same
    # function through two layers, within SAME_FUNCTION of the logits' magnitude (its justification)
    assert_close(merged(IDS), compiled(IDS), rel=SAME_FUNCTION, why="merged weights are the adapted weights")
    assert_differs(merged(IDS), _logits(model), rel=100 * SAME_FUNCTION, why="the merge kept the adapters")


def test_experts_on_a_dense_model_says_what_it_has(tiny):
    with pytest.raises(peftc.SpecError) as info:
        peftc.compile(tiny("tiny-llama"), "lora experts")
    message = str(info.value)
    assert "no 'experts'" in message and "q (" in message and "down (" in message, message


@pytest.mark.parametrize("spec, words", [
    ("lora experts dropout=0.1", ("dropout", "stacked expert weights", "HF PEFT refuses")),
    ("ia3 experts", ("ia3 on the stacked expert weights is not supported yet",)),
])
def test_what_cannot_act_on_the_experts_is_refused(spec, words):
    with pytest.raises(peftc.SpecError) as info:
        peftc.compile(_shared(mixtral), spec)
    message = str(info.value)
    assert all(w in message for w in words), message


@pytest.mark.parametrize("build, names", [(mixtral, ["w1", "w2", "w3"]),
                                          (qwen3_moe, ["gate_proj", "up_proj", "down_proj"])])
def test_hf_peft_mlp_names_mapped_onto_the_experts_load_as_lora_experts(build, names, tmp_path):
    """HF PEFT 0.21 maps these target_modules onto the stacked weights (transformers 4's per-expert linears:
    gate and up fused at rank 2r, alpha 2·alpha) and writes target_parameters; peftc reads the file as LoRAs
    on the stacked weights, with equal logits (peftc's own gate/up/down name linears, which these models lack)."""
    hf = peft.get_peft_model(_seeded(build), peft.LoraConfig(r=2, lora_alpha=4, target_modules=names,
                                                             init_lora_weights=False))
    expected = _logits(hf)
    hf.save_pretrained(tmp_path)
    loaded = peftc.load_hf_peft(_shared(build), tmp_path)
    assert sorted((r.site.path, r.r, r.alpha) for r in loaded.records) == sorted(
        (f"model.layers.{i}.mlp.experts.{p}", r, a) for i in range(2) for p, r, a in (("gate_up_proj", 4, 8.0),
                                                                                     ("down_proj", 2, 4.0)))
    assert_close(loaded(IDS), expected, rel=SAME_FUNCTION, why="HF PEFT's files read into peftc's spec")
