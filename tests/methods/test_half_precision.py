"""Every method on a bfloat16 and a float16 model, as HF PEFT computes it there: the inserted weights are
float32 by default (HF PEFT's ``autocast_adapter_dtype=True``: the input is cast to float32, the result
back), or in the model's dtype with ``autocast_adapter_dtype=False``. LoRA, IA3, prefix and prompt are
checked against HF PEFT loading peftc's own files; adapter, bitfit and full against eager references."""
import pytest
import torch
from peft import PeftModel

import peftc
from conftest import randomize_adapters, token_ids
from numerics import assert_close, assert_differs, half_reordered

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HF_SPECS = ["lora q,v r=4", "lora all-linear r=4", "ia3 k,v,down", "prefix tokens=3", "prompt tokens=3"]


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


@pytest.mark.parametrize("autocast", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["autocast", "base-dtype"])
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("spec", HF_SPECS)
def test_equals_hf_peft_on_a_half_precision_model(spec, name, autocast, tmp_path):
    model = peftc.compile("tiny-llama", spec, dtype=name, autocast_adapter_dtype=autocast, seed=0)
    randomize_adapters(model)
    expected_dtype = torch.float32 if autocast else DTYPES[name]
    assert {p.dtype for p in model.adapter_parameters().values()} == {expected_dtype}
    ids = token_ids()
    ours = _logits(model, ids)
    model.save_hf_peft(tmp_path)
    hf = PeftModel.from_pretrained(peftc.load_model("tiny-llama", name), str(tmp_path),
                                   autocast_adapter_dtype=autocast).eval()
    theirs = _logits(hf, ids)[:, -ids.shape[1]:]         # prompt tuning: HF PEFT returns the virtual tokens too
    assert model(ids).dtype == DTYPES[name]
    assert_close(ours, theirs, rel=half_reordered(DTYPES[name]), why="HF PEFT's modules, summed in another order")
    base = _logits(peftc.load_model("tiny-llama", name), ids)
    assert_differs(theirs, base, rel=4 * half_reordered(DTYPES[name]), why="the random adapters change the logits "
                   "(by 128 eps of the largest or more), far more than the bound above")


def _eager_adapter(hf, compiled, scale: float) -> None:
    """HF's model with forward hooks adding each bottleneck adapter of ``compiled`` after o/down, in float32
    (h + scale · up(relu(down(h))), cast back to the model's dtype)."""
    gm = compiled.graph_module
    for record in compiled.records:
        adapter = gm.get_submodule(record.module)

        def hook(_module, _inputs, out, adapter=adapter):
            h = out.float()
            return (h + scale * adapter.up(torch.relu(adapter.down(h)))).to(out.dtype)
        hf.get_submodule(record.site.path).register_forward_hook(hook)


@pytest.mark.parametrize("name", DTYPES)
def test_adapter_bitfit_full_equal_eager_references(name):
    dtype, ids = DTYPES[name], token_ids()
    model = peftc.compile("tiny-llama", "adapter bottleneck=8 scale=0.5", dtype=name, seed=0)
    randomize_adapters(model)
    hf = peftc.load_model("tiny-llama", name)
    _eager_adapter(hf, model, 0.5)
    assert {p.dtype for p in model.adapter_parameters().values()} == {torch.float32}
    assert_close(_logits(model, ids), _logits(hf, ids), rel=half_reordered(dtype), why="hooks on the eager model")

    for spec in ("bitfit", "full o"):
        model = peftc.compile("tiny-llama", spec, dtype=name, seed=0)
        randomize_adapters(model)
        hf = peftc.load_model("tiny-llama", name)
        for key, value in model.adapter_parameters().items():
            owner, _, attr = key.rpartition(".")
            assert value.dtype == dtype           # trained in place of the base's own tensors, in its dtype
            setattr(hf.get_submodule(owner), attr, torch.nn.Parameter(value.detach().clone()))
        assert_close(_logits(model, ids), _logits(hf, ids), rel=half_reordered(dtype),
                     why=f"{spec}: the eager model with the same tensors")


@pytest.mark.parametrize("name", DTYPES)
def test_merge_keeps_the_base_dtype(name):
    dtype, ids = DTYPES[name], token_ids()
    model = peftc.compile("tiny-llama", "lora all-linear r=4; ia3 k,v", dtype=name, seed=0)
    randomize_adapters(model, scale=0.05)
    merged = model.merge()
    assert {p.dtype for p in merged.graph_module.parameters()} == {dtype}
    # the merged weight W + ΔW is rounded to the dtype once, where the unmerged model rounds W x and ΔW x
    # separately; each logit moves by a few of that dtype's eps of the largest one
    assert_close(_logits(merged, ids), _logits(model, ids), rel=4 * half_reordered(dtype),
                 why="one more rounding of each folded weight")


@pytest.mark.slow
@pytest.mark.parametrize("name", DTYPES)
def test_qlora_on_a_half_precision_checkpoint_equals_bitsandbytes_and_hf_peft(name, tmp_path):
    """QLoRA as users run it: a bf16 checkpoint loaded by transformers with bitsandbytes' NF4 (compute
    dtype the model's) and HF PEFT's LoRA from peftc's files, against ``quant nf4 base; lora q,v``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    dtype, ids = DTYPES[name], token_ids()
    checkpoint = tmp_path / "checkpoint"
    peftc.load_model("tiny-llama", "bf16").save_pretrained(checkpoint)
    model = peftc.compile(str(checkpoint), "quant nf4 base block=64; lora q,v r=4", dtype=name, seed=0)
    randomize_adapters(model)
    model.save_hf_peft(tmp_path / "adapter")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                bnb_4bit_use_double_quant=True)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, dtype=dtype)
    hf = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    # the NF4 codes are bit-identical to bitsandbytes' (tests/quant/test_nf4.py); its CPU kernel multiplies
    # in its own order, which moved the logits by up to 5.6 fp16 eps of the largest on an EPYC: 3 times the
    # bound of a plain reordering, still far below the 1300 eps the LoRA moves them
    assert_close(_logits(model, ids), _logits(hf, ids), rel=3 * half_reordered(dtype),
                 why="bitsandbytes' CPU kernel for the NF4 linears")
