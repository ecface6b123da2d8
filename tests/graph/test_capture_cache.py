"""The in-process capture cache: a second compile of a model object reuses its capture, the graphs handed
out are independent, weights are shared and never written, and what changes a capture misses the cache."""
import gc
import weakref

import pytest
import torch
from torch import nn

import peftc
from peftc.graph.capture import capture, clear_cache
from peftc.compiler.compiled import op_histogram
from conftest import randomize_adapters, token_ids
from numerics import SAME_FUNCTION, assert_close, assert_differs


@pytest.fixture
def model():
    """A tiny model of this test's own (these tests replace and move its weights), and an empty cache."""
    clear_cache()
    return peftc.load_model("tiny-llama")


def cold(model, spec, monkeypatch, **kwargs):
    """A compile that captures afresh, as without the cache."""
    with monkeypatch.context() as patch:
        patch.setenv("PEFTC_CAPTURE_CACHE", "0")
        return peftc.compile(model, spec, **kwargs)


@pytest.mark.slow
def test_second_compile_hits_the_cache_and_equals_a_cold_compile(model, monkeypatch):
    first = peftc.compile(model, "lora q, v r=4")
    assert "capture" in first.timings and "capture_cached" not in first.timings
    spec = "lora k, o r=2 alpha=4\nia3 v"
    second = peftc.compile(model, spec, seed=1)
    assert "capture_cached" in second.timings and "capture" not in second.timings
    randomize_adapters(second)
    reference = cold(model, spec, monkeypatch, seed=1)
    assert "capture" in reference.timings
    randomize_adapters(reference)
    assert reference.dump_graph() == second.dump_graph()
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(second(ids), reference(ids))


@pytest.mark.slow
def test_compiled_models_are_independent_and_share_base_weights(model):
    first = peftc.compile(model, "lora q, v r=4")
    randomize_adapters(first)
    ids = token_ids()
    with torch.no_grad():
        before = first(ids)
    graph_before = first.dump_graph()
    second = peftc.compile(model, "quant nf4 base\nlora all-linear r=2\nbitfit o")
    randomize_adapters(second, seed=1)
    second.merge()
    assert first.graph_module.graph is not second.graph_module.graph
    assert first.dump_graph() == graph_before
    with torch.no_grad():
        assert torch.equal(first(ids), before)
    embed = "hf.model.embed_tokens.weight"
    assert second.graph_module.get_parameter(embed) is first.graph_module.get_parameter(embed)
    assert first.graph_module.get_parameter(embed) is model.model.embed_tokens.weight


@pytest.mark.slow
def test_in_place_weight_updates_keep_the_capture_and_reach_its_graph(model):
    capture(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
    again = capture(model)
    assert again.cached
    ids = token_ids()
    with torch.no_grad():
        assert_close(again.gm(ids, torch.ones_like(ids)), model(input_ids=ids).logits, rel=SAME_FUNCTION,
                     why="the captured graph and transformers' eager modules")


@pytest.mark.slow
def test_replacing_a_parameter_or_module_or_the_dtype_misses_the_cache(model):
    assert not capture(model).cached
    assert capture(model).cached
    q = model.model.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(q.weight.detach().clone())
    assert not capture(model).cached
    assert capture(model).cached
    model.model.layers[1].mlp.act_fn = nn.SiLU()
    assert not capture(model).cached
    model.to(torch.float64)
    recaptured = capture(model)
    assert not recaptured.cached
    assert recaptured.gm.get_parameter("hf.lm_head.weight").dtype == torch.float64


@pytest.mark.slow
def test_the_cache_does_not_keep_a_deleted_model_alive():
    model = peftc.load_model("tiny-llama")
    compiled = peftc.compile(model, "lora q r=2")
    assert peftc.compile(model, "lora v r=2").timings.get("capture_cached") is not None
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    with torch.no_grad():             # the compiled model holds the weights it reads, not the model
        assert compiled(token_ids()).shape[:2] == (2, 12)


@pytest.mark.slow
def test_the_environment_variable_turns_the_cache_off(model, monkeypatch):
    monkeypatch.setenv("PEFTC_CAPTURE_CACHE", "0")
    assert not capture(model).cached
    assert not capture(model).cached
    assert "capture" in peftc.compile(model, "lora q r=2").timings
    monkeypatch.delenv("PEFTC_CAPTURE_CACHE")
    assert not capture(model).cached      # nothing was stored while it was off
    assert capture(model).cached


@pytest.mark.parametrize("spec", ["lora all-linear r=4\nia3 k, v\nbitfit o\nfull head",
                                  "quant nf4 base\nlora q, v r=4"])
@pytest.mark.slow
def test_merge_of_a_cached_compile_leaves_the_base_weights_untouched(model, monkeypatch, spec):
    weights = {name: t.clone() for name, t in model.state_dict().items()}
    peftc.compile(model, "lora q r=2")
    adapted = peftc.compile(model, spec)
    assert "capture_cached" in adapted.timings
    randomize_adapters(adapted)
    merged = adapted.merge()
    assert not merged.records
    assert all(torch.equal(t, weights[name]) for name, t in model.state_dict().items())
    base = peftc.compile(model, "")
    assert "capture_cached" in base.timings
    assert op_histogram(merged.graph_module) == op_histogram(base.graph_module)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(base(ids), cold(model, "", monkeypatch)(ids))
        assert_differs(merged(ids), base(ids), rel=1e-3, why="live adapters")  # the merged adapters are really there


@pytest.mark.slow
def test_grouped_query_attention_reads_kv_heads_without_copies(tiny):
    """transformers repeats grouped keys and values for every query head before SDPA (a copy per layer);
    the capture hands SDPA the grouped tensors with enable_gqa instead, and computes exactly what the
    model computes, padded rows included."""
    for ref in ("tiny-llama", "tiny-phi3"):
        model = tiny(ref)
        compiled = peftc.compile(model, "")
        graph = compiled.graph_module.graph
        attentions = [n for n in graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
        assert attentions and all(n.kwargs.get("enable_gqa") for n in attentions)
        assert not any(n.target is torch.ops.aten.expand.default and n.users and
                       next(iter(n.users)).target is torch.ops.aten.reshape.default for n in graph.nodes)
        ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            assert torch.equal(compiled(ids, mask)[mask.bool()], expected[mask.bool()])
