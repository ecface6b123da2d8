"""Several methods in one spec: a deterministic order, merge folds what it can, ONNX Runtime runs it all."""
import pytest
import torch

import peftc
from conftest import token_ids
from numerics import SAME_FUNCTION, assert_close, assert_export_close

MIXED = "adapter after=ffn bottleneck=4\nia3 k, v, down\nbitfit o\nlora q, v r=4\nfull head"


def live(model, seed=0):
    """Move every inserted parameter off its initial value, so nothing passes trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def test_passes_run_in_rank_order_whatever_the_spec_order(tiny):
    model = peftc.compile(tiny("tiny-llama"), MIXED)
    order = []
    for record in model.records:
        if not order or order[-1] != record.method:
            order.append(record.method)
    assert order == ["full", "bitfit", "lora", "ia3", "adapter"]
    again = peftc.compile(tiny("tiny-llama"), "\n".join(reversed(MIXED.splitlines())))
    assert [r.method for r in again.records] == [r.method for r in model.records]


@pytest.mark.slow
def test_mixed_spec_merges_what_folds_and_exports(tiny, tmp_path):
    model = peftc.compile(tiny("tiny-llama"), MIXED)
    live(model)
    ids = token_ids(seq=10)
    merged = model.merge()
    assert {r.method for r in merged.records} == {"adapter"}           # the only method that cannot fold
    with torch.no_grad():
        ours = model(ids)
        assert_close(merged(ids), ours, rel=SAME_FUNCTION, why="a merged weight: one rounding, another order")
    for name, module in [("unmerged", model), ("merged", merged)]:
        result = peftc.export_onnx(module, tmp_path / f"{name}.onnx")
        assert_export_close(result)
    model.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["peftc_adapter.safetensors"]
    again = peftc.compile(tiny("tiny-llama"), MIXED).load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(ids), ours)


@pytest.mark.parametrize("spec", ["ia3 k, v, down", "bitfit", "full o layers=1", "adapter bottleneck=4 parallel=true"])
@pytest.mark.slow
def test_each_method_exports_to_onnx(spec, tiny, tmp_path):
    model = peftc.compile(tiny("tiny-llama"), spec)
    live(model)
    result = peftc.export_onnx(model, tmp_path / "m.onnx")
    assert_export_close(result)
    merged = peftc.export_onnx(model.merge(), tmp_path / "merged.onnx")
    assert_export_close(merged)


def test_lora_and_ia3_on_one_linear_stack(tiny):
    """ia3 runs after lora, so it scales the adapted output: y = l * (W x + s B A x)."""
    model = peftc.compile(tiny("tiny-llama"), "lora v r=2 alpha=4; ia3 v")
    live(model)
    params = {k: v.detach() for k, v in model.adapter_parameters().items()}
    reference = peftc.load_model("tiny-llama")
    for layer in range(4):
        path = f"model.layers.{layer}.self_attn.v_proj"
        a, b, l = params[f"{path}.lora_A"], params[f"{path}.lora_B"], params[f"{path}.ia3_l"]

        def hook(m, args, out, a=a, b=b, l=l):
            return l * (out + 2.0 * (args[0] @ a.T) @ b.T)
        reference.get_submodule(path).register_forward_hook(hook)
    ids = token_ids()
    with torch.no_grad():
        ours = model(ids)
        assert_close(ours, reference(input_ids=ids).logits, rel=SAME_FUNCTION,
                     why="HF PEFT's modules sum in another order")
        assert_close(model.merge()(ids), ours, rel=SAME_FUNCTION, why="a merged weight: one rounding, another order")


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gpt2", "tiny-falcon"])
def test_bitfit_and_ia3_on_the_same_linears_merge_exactly(ref, tiny):
    model = peftc.compile(tiny(ref), "bitfit all-linear; ia3 all-linear")
    live(model)
    ids = token_ids()
    with torch.no_grad():
        assert_close(model.merge()(ids), model(ids), rel=SAME_FUNCTION,
                     why="a merged weight: one rounding, another order")
