"""The quant pass: QLoRA on a quantized base — graph, training, merge, report, errors, architectures."""
import json
import re

import pytest
import torch
from conftest import randomize_adapters, token_ids

import peftc
from peftc.quant import ops as qops
from peftc.compiler.compiled import op_histogram
from peftc.quant.rewrite import QuantizedWeight
from numerics import SAME_FUNCTION, assert_close

QLORA = "quant nf4 base\nlora q, v r=4 alpha=8"


def _quantized_nodes(model, scheme="nf4"):
    return [n for n in model.graph_module.graph.nodes
            if n.op == "call_function" and (qops.parse_op(n.target) or ("", ""))[0] == scheme]


def test_quant_base_replaces_every_linear_but_the_head(tiny):
    model = peftc.compile(tiny("tiny-llama"), QLORA, seed=0)
    linears = [s for s in model.sites.linears if s.role != "head"]
    nodes = _quantized_nodes(model)
    assert sorted(n.name for n in nodes) == sorted(s.node for s in linears)   # same nodes, same names
    params = dict(model.graph_module.named_parameters())
    assert not any(s.weight in params for s in linears)                       # the float weights are gone
    head = next(s for s in model.sites.linears if s.role == "head")
    assert head.weight in params
    buffers = [b for m in model.graph_module.modules() if isinstance(m, QuantizedWeight) for b in m.buffers()]
    assert buffers and all(not b.requires_grad and not isinstance(b, torch.nn.Parameter) for b in buffers)
    lora = [n for n in model.graph_module.graph.nodes if n.meta.get("peftc", {}).get("pass") == "lora"]
    assert lora                                                               # LoRA attached on top
    assert all(n.meta["peftc"]["span"] == "<spec>:1:1" for n in model.graph_module.graph.nodes
               if n.meta.get("peftc", {}).get("pass") == "quant")


@pytest.mark.slow
def test_quant_runs_before_lora_whatever_the_spec_order(tiny):
    a = peftc.compile(tiny("tiny-llama"), "lora q, v r=4\nquant nf4 base", seed=0)
    b = peftc.compile(tiny("tiny-llama"), "quant nf4 base\nlora q, v r=4", seed=0)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_qlora_trains_only_the_lora_weights(tiny):
    model = peftc.compile(tiny("tiny-llama"), QLORA, seed=0)
    ids = token_ids(batch=4, seq=16)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(not torch.equal(before[n], p) for n, p in trainable.items() if n.endswith("lora_B"))
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())


def test_quantized_model_is_close_to_the_float_model(tiny):
    ids = token_ids()
    with torch.no_grad():
        float_logits = peftc.compile(tiny("tiny-llama"), "lora q r=2", seed=0)(ids)
        nf4_logits = peftc.compile(tiny("tiny-llama"), "quant nf4 base; lora q r=2", seed=0)(ids)
        int8_logits = peftc.compile(tiny("tiny-llama"), "quant int8 base; lora q r=2", seed=0)(ids)
    scale = float_logits.abs().max()
    assert 0 < (nf4_logits - float_logits).abs().max() < 0.3 * scale
    assert 0 < (int8_logits - float_logits).abs().max() < 0.03 * scale


def test_merge_folds_lora_onto_the_dequantized_weight(tiny):
    model = peftc.compile(tiny("tiny-llama"), QLORA, seed=0)
    randomize_adapters(model)
    site = next(r.site for r in model.records if r.method == "lora")
    quantized = next(m for m in model.graph_module.modules()
                     if isinstance(m, QuantizedWeight) and m.params[0] == (site.out_features, site.in_features))
    merged = model.merge()
    base = peftc.compile(tiny("tiny-llama"), "", seed=0)
    assert op_histogram(merged.graph_module) == op_histogram(base.graph_module)
    assert not _quantized_nodes(merged)
    assert [r.method for r in merged.folded].count("quant") == 28
    ids = token_ids()
    with torch.no_grad():
        assert_close(merged(ids), model(ids), rel=SAME_FUNCTION, why="a merged weight: one rounding, another order")
    # the merged weight of a LoRA site is exactly dequant(W_nf4) + s·B·A
    record = next(r for r in model.records if r.method == "lora" and r.site.node == site.node)
    node = next(n for n in merged.graph_module.graph.nodes if n.name == site.node)
    weight = merged.graph_module.get_parameter(node.args[1].target)
    dequantized = next(m for m in model.graph_module.modules() if isinstance(m, QuantizedWeight)
                       and m is quantized).dequantize()
    weights = model.graph_module.get_submodule(record.module)
    expected = dequantized + record.scale * (weights.lora_B @ weights.lora_A)
    assert torch.equal(weight, expected.detach())


def test_report_shows_bytes_by_precision_and_bits_per_weight(tiny):
    model = peftc.compile(tiny("tiny-llama"), QLORA, seed=0)
    report = model.report()
    memory = report.memory
    assert set(memory.base) == {"float32", "nf4"}
    nf4 = memory.base["nf4"]
    assert nf4.linears == 28 and nf4.weights == sum(s.in_features * s.out_features for s in model.sites.linears
                                                    if s.role != "head")
    assert 4.0 < nf4.bits_per_weight <= 4.2
    text = str(report)
    assert f"in 28 linears: {nf4.bits_per_weight:.3f} bits per weight" in text
    assert report.total == sum(p.numel() for p in model.parameters()) + nf4.weights
    assert report.statements[0][1:] == (28, 0)
    assert report.to_dict()["memory"]["base"]["nf4"]["linears"] == 28


def test_quant_int8_and_a_gpt2_conv1d(tiny):
    model = peftc.compile(tiny("tiny-gpt2"), "quant int8 base\nlora \"transformer.h.*.attn.c_attn\" r=2", seed=0)
    nodes = _quantized_nodes(model, "int8")
    assert nodes and all(qops.parse_op(n.target)[1] == "addmm" for n in nodes)
    randomize_adapters(model)
    ids = token_ids(vocab=100)
    with torch.no_grad():
        assert_close(model.merge()(ids), model(ids), rel=SAME_FUNCTION,
                     why="a merged weight: one rounding, another order")


def test_quant_options_select_and_exclude(tiny):
    model = peftc.compile(tiny("tiny-llama"), "quant nf4 attn layers=0..1 block=32 double_quant=false", seed=0)
    assert len(_quantized_nodes(model)) == 8
    module = next(m for m in model.graph_module.modules() if isinstance(m, QuantizedWeight))
    assert module.params[1] == 32 and module.absmax_scale is None and module.absmax.dtype == torch.float32
    model = peftc.compile(tiny("tiny-llama"), "quant nf4 base exclude=down", seed=0)
    assert len(_quantized_nodes(model)) == 24


@pytest.mark.parametrize("spec,line,column,message", [
    ("quant nf4 embed", 1, 11, "quant on the token embedding is not supported yet"),
    ("quant nf4 \"model.norm\"", 1, 1, "selects nothing in the model"),
    ("quant nf4 q\nquant int8 attn", 2, 1, "this quant statement quantizes model.layers.0.self_attn.q_proj again; "
                                          "line 1 (column 1) already does"),
])
def test_quant_mistakes_name_the_statement(tiny, spec, line, column, message):
    with pytest.raises(peftc.SpecError, match=re.escape(message)) as err:
        peftc.compile(tiny("tiny-llama"), spec)
    assert (err.value.line, err.value.column) == (line, column)


def test_qlora_adapter_files_hold_only_the_lora(tiny, tmp_path):
    model = peftc.compile(tiny("tiny-llama"), QLORA, seed=0)
    randomize_adapters(model)
    model.save_hf_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(config["target_modules"]) == 8
    again = peftc.compile(tiny("tiny-llama"), QLORA, seed=1).load_adapter(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_sample_qlora_compiles(tiny):
    from pathlib import Path
    spec = peftc.parse_file(Path(__file__).resolve().parents[2] / "samples" / "qlora.peft")
    assert peftc.compile(tiny("tiny-llama"), spec).report().memory.base["nf4"].linears == 28


@pytest.mark.parametrize("ref", ["tiny-gpt2", "tiny-bert", "tiny-phi3", "tiny-neox", "tiny-opt", "tiny-falcon"])
def test_quant_base_on_every_architecture_merges_back_to_the_base_graph(tiny, ref):
    model = peftc.compile(tiny(ref), "quant nf4 base", seed=0)
    base = peftc.compile(tiny(ref), "", seed=0)
    assert len(_quantized_nodes(model)) == sum(1 for s in model.sites.linears if s.role != "head") > 0
    ids = token_ids(vocab=100)
    merged = model.merge()
    with torch.no_grad():
        quantized, reference = model(ids), base(ids)
        assert torch.equal(merged(ids), quantized)
    assert 0 < (quantized - reference).abs().max() < 0.3 * reference.abs().max()
    assert op_histogram(merged.graph_module) == op_histogram(base.graph_module)


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gpt2", "tiny-falcon"])
@pytest.mark.parametrize("method,name", [("bitfit", "bias"), ("ia3 all-linear", "ia3_l")])
def test_quantized_base_stacks_with_bitfit_and_ia3(tiny, ref, method, name):
    model = peftc.compile(tiny(ref), f"quant nf4 base\n{method}\nlora q r=2", seed=0)
    assert _quantized_nodes(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01)
    ids = token_ids(vocab=100)
    model.train()
    model(ids).pow(2).mean().backward()
    model.eval()
    methods = {name.split(".")[-1] for name, p in model.adapter_parameters().items() if p.grad is not None}
    assert {name, "lora_A"} <= methods
    with torch.no_grad():
        assert_close(model.merge()(ids), model(ids), rel=SAME_FUNCTION,
                     why="a merged weight: one rounding, another order")


def test_full_cannot_train_a_quantized_weight(tiny):
    with pytest.raises(peftc.SpecError, match="selects only linears a 'full' statement trains"):
        peftc.compile(tiny("tiny-llama"), "quant nf4 o\nfull o")
