"""Bottleneck adapters against an eager reference: the same adapter math applied by forward hooks."""
import pytest
import torch

import peftc
from peftc.compiler.compiled import op_histogram
from conftest import token_ids
from numerics import SAME_FUNCTION, assert_close, assert_differs

ACTS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
        "tanh": torch.tanh}
#: per architecture: (attention output projection, first MLP projection, MLP down projection) module names
NAMES = {"tiny-llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.self_attn.q_proj",
                        "model.layers.{}.mlp.down_proj", "model.layers.{}.mlp.gate_proj"),
         "tiny-gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.attn.c_attn",
                       "transformer.h.{}.mlp.c_proj", "transformer.h.{}.mlp.c_fc"),
         "tiny-bert": ("encoder.layer.{}.attention.output.dense", "encoder.layer.{}.attention.self.query",
                       "encoder.layer.{}.output.dense", "encoder.layer.{}.intermediate.dense")}


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def eager_reference(ref, adapters, parallel, act, scale):
    """``adapters``: {(after, layer): BottleneckAdapter weights}; hooks add them to the HF model."""
    model = peftc.load_model(ref)
    o, q, down, first = NAMES[ref]
    for (after, layer), weights in adapters.items():
        out_name, in_name = (o, q) if after == "attn" else (down, first)
        seen = {}
        model.get_submodule(in_name.format(layer)).register_forward_pre_hook(
            lambda m, args, seen=seen: seen.__setitem__("x", args[0]))

        def hook(m, args, out, w=weights, seen=seen):
            src = seen["x"] if parallel else out
            h = ACTS[act](src @ w["down.weight"].T + w["down.bias"])
            return out + scale * (h @ w["up.weight"].T + w["up.bias"])
        model.get_submodule(out_name.format(layer)).register_forward_hook(hook)
    return model


@pytest.mark.parametrize("ref, spec", [
    ("tiny-llama", "adapter bottleneck=8"),
    ("tiny-llama", "adapter after=ffn bottleneck=4 act=gelu layers=1..2"),
    ("tiny-gpt2", "adapter after=attn,ffn bottleneck=8 parallel=true act=silu scale=2"),
    ("tiny-bert", "adapter after=ffn bottleneck=6 act=tanh"),
])
@pytest.mark.slow
def test_adapter_equals_eager_reference(ref, spec, tiny):
    model = peftc.compile(tiny(ref), spec)
    options = model.spec.statements[0].options
    ids = token_ids(seq=10)
    with torch.no_grad():
        assert torch.equal(model(ids), outputs(tiny(ref), ids))       # up starts at zero
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    adapters = {}
    for record in model.records:
        params = record.parameters(model.graph_module)
        adapters[(record.after, record.site.layer)] = {k: v.detach() for k, v in params.items()}
    layers = options["layers"]
    expected = {(a, i) for a in options["after"] for i in range(4) if layers is None or layers.contains(i)}
    assert set(adapters) == expected
    reference = eager_reference(ref, adapters, options["parallel"], options["act"], options["scale"])
    with torch.no_grad():
        ours = model(ids)
        assert_differs(ours, outputs(tiny(ref), ids), rel=1e-3, why="live adapters")
        assert_close(ours, outputs(reference, ids), rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
        merged = model.merge()                                          # adapters stay as graph ops
        assert torch.equal(merged(ids), ours)
    assert op_histogram(merged.graph_module) == op_histogram(model.graph_module)


def test_adapter_trains_only_its_parameters(tiny):
    model = peftc.compile(tiny("tiny-llama"), "adapter bottleneck=4")
    assert model.report().trainable == 8 * (64 * 4 + 4 + 4 * 64 + 64)
    model(token_ids()).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
