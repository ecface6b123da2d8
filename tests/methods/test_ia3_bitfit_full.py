"""ia3 against HF PEFT; bitfit and full against the same change made by hand to the eager model."""
import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model

import peftc
from peftc.compiler.compiled import op_histogram
from conftest import token_ids
from numerics import SAME_FUNCTION, assert_close, assert_differs


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def perturb(model, seed=0, around=0.0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.copy_(around + scale * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("ref, spec", [("tiny-llama", "ia3 k, v, down"), ("tiny-gpt2", "ia3 k, v, down"),
                                       ("tiny-bert", "ia3 attn, ffn layers=1..2"),
                                       ("tiny-falcon", "ia3 v, o, up, down"), ("tiny-phi3", "ia3 k, v, gate")])
@pytest.mark.slow
def test_ia3_equals_hf_peft_both_ways_and_merges(ref, spec, tiny, tmp_path):
    model = peftc.compile(tiny(ref), spec)
    ids = token_ids(seq=10)
    base = outputs(tiny(ref), ids)
    with torch.no_grad():
        assert torch.equal(model(ids), base)                  # scales start at one
    perturb(model, around=1.0)
    model.save_hf_peft(tmp_path)
    with torch.no_grad():
        ours = model(ids)
    theirs = outputs(PeftModel.from_pretrained(peftc.load_model(ref), str(tmp_path)).eval(), ids)
    assert_differs(ours, base, rel=1e-2, why="live adapters")
    assert_close(ours, theirs, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
    back = peftc.load_hf_peft(peftc.load_model(ref), tmp_path)
    with torch.no_grad():
        assert_close(back(ids), ours, rel=SAME_FUNCTION, why="the same weights through another load path")
        merged = model.merge()
        assert_close(merged(ids), ours, rel=SAME_FUNCTION, why="a merged weight: one rounding, another order")
    assert op_histogram(merged.graph_module) == op_histogram(peftc.compile(tiny(ref), "").graph_module)


@pytest.mark.slow
def test_ia3_trainable_count_equals_hf_peft():
    report = peftc.compile(peftc.load_model("tiny-llama"), "ia3 k, v, down").report()
    hf = get_peft_model(peftc.load_model("tiny-llama"),
                        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert (report.trainable, report.total) == hf.get_nb_trainable_parameters()


def test_ia3_on_gpt2_scales_only_the_k_and_v_slices(tiny, tmp_path):
    model = peftc.compile(tiny("tiny-gpt2"), "ia3 k, v")
    assert model.report().trainable == 4 * 128                 # 64 k + 64 v features per layer, not 192
    perturb(model, around=1.0)
    model.save_hf_peft(tmp_path)
    from safetensors.torch import load_file
    l = load_file(tmp_path / "adapter_model.safetensors")["base_model.model.transformer.h.0.attn.c_attn.ia3_l"]
    assert l.shape == (192, 1) and torch.equal(l[:64], torch.ones(64, 1)) and not torch.equal(l[64:], torch.ones(128, 1))


def add_biases_by_hand(hf_model, biases: dict[str, torch.Tensor]):
    """The eager reference: give each named nn.Linear the bias (created if missing)."""
    for path, value in biases.items():
        module = hf_model.get_submodule(path)
        module.bias = torch.nn.Parameter(value.clone())
    return hf_model


@pytest.mark.parametrize("ref, spec", [("tiny-llama", "bitfit"), ("tiny-llama", "bitfit q, down layers=1..2"),
                                       ("tiny-gpt2", "bitfit attn"), ("tiny-falcon", "bitfit ffn")])
def test_bitfit_equals_biases_set_by_hand(ref, spec, tiny):
    model = peftc.compile(tiny(ref), spec)
    ids = token_ids(seq=10)
    with torch.no_grad():
        assert torch.equal(model(ids), outputs(tiny(ref), ids))      # zero biases where there were none
    assert all(name.endswith(".bias") for name in model.adapter_parameters())
    assert model.report().trainable == sum(p.numel() for p in model.adapter_parameters().values())
    perturb(model, scale=0.1)
    biases = {name[:-len(".bias")]: p.detach() for name, p in model.adapter_parameters().items()}
    reference = add_biases_by_hand(peftc.load_model(ref), biases)
    with torch.no_grad():
        ours = model(ids)
        assert_close(ours, outputs(reference, ids), rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
        assert (model.merge()(ids) - ours).abs().max() == 0
    with torch.no_grad():                                          # the user's model is never changed
        assert torch.equal(outputs(tiny(ref), ids), outputs(peftc.load_model(ref), ids))


def test_bitfit_on_llama_counts_every_linear_but_the_head(tiny):
    model = peftc.compile(tiny("tiny-llama"), "bitfit")
    sites = [s for s in model.sites.linears if s.role != "head"]
    assert model.report().trainable == sum(s.out_features for s in sites)


def test_full_trains_copies_and_unties_the_head(tiny):
    model = peftc.compile(tiny("tiny-llama"), "full head; lora q r=2")
    names = set(model.adapter_parameters())
    assert "lm_head.weight" in names
    ids = token_ids(seq=8)
    optimizer = torch.optim.SGD(list(model.adapter_parameters().values()), lr=0.5)
    model(ids).float().pow(2).mean().backward()
    optimizer.step()
    embed = tiny("tiny-llama").model.embed_tokens.weight
    assert torch.equal(model.graph_module.get_parameter("hf.model.embed_tokens.weight"), embed)
    assert not torch.equal(model.adapter_parameters()["lm_head.weight"], embed)
    reference = peftc.load_model("tiny-llama")
    reference.lm_head.weight = torch.nn.Parameter(model.adapter_parameters()["lm_head.weight"].detach().clone())
    model2 = peftc.compile(peftc.load_model("tiny-llama"), "full head")
    with torch.no_grad():
        model2.adapter_parameters()["lm_head.weight"].copy_(reference.lm_head.weight)
        assert_close(model2(ids), outputs(reference, ids), rel=SAME_FUNCTION,
                     why="HF PEFT's modules sum in another order")


def test_owned_parameters_cannot_be_claimed_twice(tiny):
    with pytest.raises(peftc.SpecError, match="line 1 .column 1, full. already trains") as err:
        peftc.compile(tiny("tiny-gpt2"), "full o\nbitfit attn")
    assert err.value.line == 2
    both = peftc.compile(tiny("tiny-llama"), "full o\nbitfit attn")   # LLaMA's o has no bias: full trains W,
    assert {"model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.bias"} <= \
        set(both.adapter_parameters())                                  # and bitfit adds a bias beside it
