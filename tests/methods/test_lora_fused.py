"""LoRA sites that read the same input compute their A projections as one matmul, exactly as apart."""
import pytest
import torch

import peftc
from peftc.methods.lora import rewrite as lora
from peftc.compiler.compiled import op_histogram
from conftest import randomize_adapters, token_ids
from numerics import REORDERED, REORDERED_GRADIENT, SAME_FUNCTION, assert_close

aten = torch.ops.aten


def fused_matmuls(model) -> list:
    """The linear nodes whose weight is a concatenation of A weights."""
    return [n for n in model.graph_module.graph.nodes if n.target is aten.linear.default
            and getattr(n.args[1], "target", None) is aten.cat.default]


def own_a_matmuls(model) -> list:
    """The linear nodes reading one site's ``lora_A`` directly."""
    return [n for n in model.graph_module.graph.nodes if n.target is aten.linear.default
            and getattr(n.args[1], "op", None) == "get_attr" and n.args[1].target.endswith(".lora_A")]


def unfused(model, spec, monkeypatch, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(lora, "FUSE_SHARED_INPUTS", False)
        return peftc.compile(model, spec, **kwargs)


def test_q_and_v_a_projections_are_one_matmul_per_layer(tiny, monkeypatch):
    model = peftc.compile(tiny("tiny-llama"), "lora q, v r=8")
    fused = fused_matmuls(model)
    assert len(fused) == model.sites.n_layers == 4
    assert not own_a_matmuls(model)
    assert all(len(n.users) == 2 and n.args[1].args[0][0].target.endswith(".lora_A") for n in fused)
    assert len(own_a_matmuls(unfused(tiny("tiny-llama"), "lora q, v r=8", monkeypatch))) == 8
    tags = {n.meta["peftc"]["pass"] for n in fused}
    assert tags == {"lora"}
    assert sorted(model.adapter_parameters()) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.lora_{m}" for i in range(4) for p in "qv" for m in "AB")


@pytest.mark.parametrize("ref, spec, groups", [
    ("tiny-llama", "lora q, v r=8", 4),
    ("tiny-llama", "lora all-linear r=4 alpha=8", 8),            # q,k,v and gate,up of each layer
    ("tiny-llama", "lora q r=4\nlora v r=8 alpha=16 rslora=true", 4),   # across statements and ranks
    ("tiny-llama", "quant nf4 base\nlora q, k, v r=4", 4),
    ("tiny-bert", "lora q, k, v r=4", 4),
])
@pytest.mark.slow
def test_outputs_and_gradients_equal_an_unfused_compile(tiny, monkeypatch, ref, spec, groups):
    model = peftc.compile(tiny(ref), spec, seed=0)
    apart = unfused(tiny(ref), spec, monkeypatch, seed=0)
    assert len(fused_matmuls(model)) == groups and not fused_matmuls(apart)
    ids = token_ids(vocab=100)
    projection = None
    results = []
    for compiled in (model, apart):
        randomize_adapters(compiled)
        out = compiled(ids)
        if projection is None:      # a fixed random readout: every LoRA weight moves the loss (a mean of
            # squares of a LayerNorm output is nearly constant, and its gradients are ~1e-10)
            projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out.float() * projection).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in compiled.adapter_parameters().items()}))
    (out, grads), (out_apart, grads_apart) = results
    # one matmul over concatenated A weights sums the same products in another order
    assert_close(out, out_apart, rel=REORDERED, why="a fused matmul reorders float32 sums")
    assert grads.keys() == grads_apart.keys()
    for name, grad in grads.items():
        assert_close(grad, grads_apart[name], rel=REORDERED_GRADIENT, why="a fused matmul reorders float32 sums",
                     name=name)


def test_dropout_is_never_fused(tiny):
    model = peftc.compile(tiny("tiny-llama"), "lora q, v r=8 dropout=0.1")
    assert not fused_matmuls(model)
    assert len(own_a_matmuls(model)) == 8
    mixed = peftc.compile(tiny("tiny-llama"), "lora q r=4 dropout=0.1\nlora k, v r=4")
    assert len(fused_matmuls(mixed)) == 4 and all(len(n.users) == 2 for n in fused_matmuls(mixed))


def test_merge_folds_fused_sites_to_the_base_ops(tiny):
    model = peftc.compile(tiny("tiny-llama"), "lora attn r=4\nlora gate, up, down r=2 alpha=4")
    assert len(fused_matmuls(model)) == 8
    randomize_adapters(model)
    graph = model.dump_graph()
    ids = token_ids()
    with torch.no_grad():
        ours = model(ids)
        merged = model.merge()
        assert_close(merged(ids), ours, rel=SAME_FUNCTION, why="merged weights round once, then reorder")
        assert torch.equal(model(ids), ours)          # the compiled model keeps its fused graph
    assert model.dump_graph() == graph
    base = peftc.compile(tiny("tiny-llama"), "")
    assert op_histogram(merged.graph_module) == op_histogram(base.graph_module)
    assert not merged.records
