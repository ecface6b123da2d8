import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftc
from peftc.compiler.compiled import op_histogram
from conftest import randomize_adapters, token_ids
from numerics import SAME_FUNCTION, assert_close, assert_differs


def hf_peft_logits(ref, directory, ids):
    base = peftc.load_model(ref)          # a fresh copy: HF PEFT rewrites its base model in place
    model = PeftModel.from_pretrained(base, str(directory)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_trainable_parameters_are_exactly_the_inserted_ones(tiny):
    model = peftc.compile(tiny("tiny-llama"), "lora q, v r=4 alpha=8")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"graph_module.peftc_lora_{i}.lora_{m}" for i in range(8) for m in "AB"}
    randomize_adapters(model)
    model(token_ids()).float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    assert all(p.grad.abs().sum() > 0 for p in model.adapter_parameters().values())


@pytest.mark.parametrize("targets, hf_targets, layers", [
    ("q, v", ["q_proj", "v_proj"], None),
    ("all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None),
    ("ffn", ["gate_proj", "up_proj", "down_proj"], [1, 2]),
])
@pytest.mark.slow
def test_trainable_count_equals_hf_peft(targets, hf_targets, layers):
    spec = f"lora {targets} r=8" + (" layers=1..2" if layers else "")
    report = peftc.compile(peftc.load_model("tiny-llama"), spec).report()
    hf = get_peft_model(peftc.load_model("tiny-llama"),
                        LoraConfig(r=8, target_modules=hf_targets, layers_to_transform=layers))
    assert (report.trainable, report.total) == hf.get_nb_trainable_parameters()
    assert f"trainable params: {report.trainable:,d} || all params: {report.total:,d}" in str(report)


def test_logits_equal_hf_peft_through_adapter_files(tiny, tmp_path):
    spec = "lora q, v r=4 alpha=16\nlora down r=2 alpha=4 layers=1..2 rslora=true"
    model = peftc.compile(tiny("tiny-llama"), spec)
    randomize_adapters(model)
    model.save_hf_peft(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        ours = model(ids)
    theirs = hf_peft_logits("tiny-llama", tmp_path, ids)
    with torch.no_grad():
        base = tiny("tiny-llama")(input_ids=ids).logits
    assert_differs(ours, base, rel=1e-2, why="live adapters")  # the adapters really change the output
    assert_close(ours, theirs, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")


def test_gpt2_conv1d_by_path_equals_hf_peft(tmp_path):
    model = peftc.compile(peftc.load_model("tiny-gpt2"), 'lora "transformer.h.*.attn.c_attn" r=4 alpha=8')
    randomize_adapters(model, seed=3)
    model.save_hf_peft(tmp_path)
    ids = token_ids(seed=1)
    with torch.no_grad():
        ours = model(ids)
    assert_close(ours, hf_peft_logits("tiny-gpt2", tmp_path, ids), rel=SAME_FUNCTION,
                 why="HF PEFT's modules sum in another order")


def test_load_hf_peft_reads_hf_peft_files(tmp_path):
    hf = get_peft_model(peftc.load_model("tiny-llama"),
                        LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "o_proj"],
                                   layers_to_transform=[0, 3], init_lora_weights=False))
    hf.eval().save_pretrained(str(tmp_path))
    ids = token_ids(seed=2)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    model = peftc.load_hf_peft(peftc.load_model("tiny-llama"), tmp_path)
    assert sorted(r.site.path for r in model.records) == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.o_proj"]
    with torch.no_grad():
        assert_close(model(ids), expected, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")


def test_merge_equals_unmerged_and_restores_base_ops(tiny):
    model = peftc.compile(tiny("tiny-llama"), "lora all-linear r=4 dropout=0.1")
    randomize_adapters(model)
    merged = model.merge()
    ids = token_ids()
    with torch.no_grad():
        assert_close(merged(ids), model(ids), rel=SAME_FUNCTION, why="a merged weight: one rounding, another order")
    base = peftc.compile(tiny("tiny-llama"), "")
    assert op_histogram(merged.graph_module) == op_histogram(base.graph_module)
    assert op_histogram(model.graph_module) != op_histogram(base.graph_module)
    assert not any(p.requires_grad for p in merged.parameters())


def test_merge_of_tied_head_keeps_embedding(tiny):
    model = peftc.compile(peftc.load_model("tiny-gpt2"), "lora head r=2")   # GPT-2 ties lm_head to wte
    randomize_adapters(model)
    merged = model.merge()
    ids = token_ids()
    with torch.no_grad():
        assert_close(merged(ids), model(ids), rel=SAME_FUNCTION, why="a merged weight: one rounding, another order")


def test_merge_refuses_nan(tiny):
    model = peftc.compile(tiny("tiny-llama"), "lora q r=2")
    with torch.no_grad():
        model.adapter_parameters()["model.layers.0.self_attn.q_proj.lora_B"][0, 0] = float("nan")
    with pytest.raises(peftc.PassError, match="model.layers.0.self_attn.q_proj.*NaN"):
        model.merge()


def test_train_and_eval_switch_dropout(tiny):
    model = peftc.compile(tiny("tiny-llama"), "lora q, v r=4 dropout=0.5")
    randomize_adapters(model)
    ids = token_ids()
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))
    assert model.training


def test_inserted_nodes_record_pass_and_span(tiny):
    model = peftc.compile(tiny("tiny-llama"), "# comment\nlora q r=2\n", filename="a.peft")
    tags = [n.meta["peftc"] for n in model.graph_module.graph.nodes if "peftc" in n.meta]
    assert tags and all(t["pass"] == "lora" and t["span"] == "a.peft:2:1" for t in tags)
    assert "+ [lora @ a.peft:2:1]" in model.dump_graph()


def test_report_per_statement_and_layer(tiny):
    report = peftc.compile(tiny("tiny-llama"), "lora q r=2 layers=0..1\nlora v r=4 layers=3").report()
    assert [(s, n) for _, s, n in report.statements] == [(2, 2 * 2 * (64 + 64)), (1, 4 * (64 + 32))]
    assert report.layers == {"0": [256, 0], "1": [256, 0], "3": [0, 384]}
    assert report.trainable == 896


@pytest.mark.parametrize("init, hf_value", [("zero", True), ("gaussian", "gaussian"), ("random", False)])
def test_init_option_matches_hf_peft_init_lora_weights(tiny, tmp_path, init, hf_value):
    torch.manual_seed(0)
    model = peftc.compile(tiny("tiny-llama"), f"lora q, v r=4 init={init}")
    ids = token_ids()
    with torch.no_grad():
        ours, base = model(ids), tiny("tiny-llama")(input_ids=ids).logits
    # only init=random starts away from the base model
    if init == "random":
        assert_differs(ours, base, rel=1e-3, why="init=random gives B non-zero values")
    else:
        assert torch.equal(ours, base)       # B is zero: the branch adds exactly 0
    model.save_hf_peft(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == hf_value
    b = torch.cat([p.flatten() for n, p in model.adapter_parameters().items() if n.endswith("lora_B")])
    assert (b.abs().max() > 0) == (init == "random")


def test_seed_makes_initialisation_reproducible_and_leaves_global_rng(tiny):
    def a_weights(model):
        return torch.cat([p.detach().flatten() for n, p in model.adapter_parameters().items() if n.endswith("lora_A")])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = a_weights(peftc.compile(tiny("tiny-llama"), "lora q r=4", seed=7))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, a_weights(peftc.compile(tiny("tiny-llama"), "lora q r=4", seed=7)))
    assert not torch.equal(first, a_weights(peftc.compile(tiny("tiny-llama"), "lora q r=4", seed=8)))
    unseeded = a_weights(peftc.compile(tiny("tiny-llama"), "lora q r=4"))
    assert not torch.equal(unseeded, a_weights(peftc.compile(tiny("tiny-llama"), "lora q r=4")))


def test_merge_shares_every_weight_no_adapter_changed(tiny):
    """merge() holds no second copy of the base: untouched weights are the very tensors of the unmerged
    model, folded ones are new, and the unmerged model still trains afterwards."""
    model = peftc.compile(tiny("tiny-llama"), "lora q, v r=4")
    randomize_adapters(model)
    merged = model.merge()
    before = {n: t for n, t in model.graph_module.named_parameters() if not n.startswith("peftc_")}
    after = dict(merged.graph_module.named_parameters())
    folded = {n for n in before if n.endswith(("q_proj.weight", "v_proj.weight"))}
    assert len(folded) == 8
    for name, tensor in before.items():
        assert (after[name] is tensor) == (name not in folded), name
    assert all(p.requires_grad for p in model.adapter_parameters().values())
