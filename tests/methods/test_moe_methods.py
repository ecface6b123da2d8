"""Methods other than ``lora experts`` on mixture-of-experts models (tiny Mixtral and Qwen2-MoE, the configs
of tests/graph/test_moe.py): ``prefix`` and ``prompt`` equal HF PEFT through peftc's files (the experts'
token numbering is not taken for position ids); ``lora``/``ia3`` on ``up, down`` reach the dense MLP
linears of an MoE block (Qwen2-MoE's shared expert), as HF PEFT's ``target_modules`` do, and where the
MLPs are only stacked expert weights (Mixtral) the error says so and names them."""
import functools

import onnxruntime as ort
import peft
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

import peftc
from conftest import randomize_adapters, token_ids
from numerics import ONNX_RUNTIME, SAME_FUNCTION, assert_close, assert_differs, assert_export_close

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             max_position_embeddings=64, num_experts_per_tok=2)
BUILD = {
    "mixtral": lambda layers: MixtralForCausalLM(MixtralConfig(intermediate_size=96, num_local_experts=4,
                                                               num_hidden_layers=layers, **SMALL)),
    "qwen2_moe": lambda layers: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        intermediate_size=96, moe_intermediate_size=32, num_experts=4, shared_expert_intermediate_size=48,
        num_hidden_layers=layers, **SMALL)),
}
IDS = token_ids(batch=2, seq=9, vocab=128, seed=3)
MASK = torch.ones_like(IDS)
MASK[1, :3] = 0                          # a left-padded row: the mask path is checked too


def fresh(name: str, layers: int = 2):
    torch.manual_seed(0)
    return BUILD[name](layers).eval()


@functools.lru_cache(maxsize=None)
def shared(name: str):
    """peftc's side: compiling never changes the model (and its capture is then cached); HF PEFT, which
    wraps the modules of the model it is given, always gets a ``fresh`` one."""
    return fresh(name)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=MASK)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("spec", ["prefix tokens=3", "prompt tokens=3"])
def test_prefix_and_prompt_equal_hf_peft_through_the_files(name, spec, tmp_path):
    """The experts scatter their outputs back through an ``arange`` over the tokens; only the rotary
    embedding's positions move by P (HF PEFT's real tokens sit at P..P+T-1 behind the prefix's cache), so
    the prefix runs and equals HF PEFT's, and a soft prompt equals HF PEFT's last T positions."""
    compiled = peftc.compile(shared(name), spec, seed=0)
    if spec.startswith("prefix"):
        assert compiled.records[0].shifted == ["arange"], "the rotary positions alone are shifted"
    randomize_adapters(compiled, scale=1.0)
    ours = logits(compiled)
    compiled.save_hf_peft(tmp_path)
    theirs = logits(peft.PeftModel.from_pretrained(fresh(name), str(tmp_path)).eval())
    if spec.startswith("prompt"):
        assert theirs.shape[1] == IDS.shape[1] + 3
        theirs = theirs[:, 3:]
    assert_differs(ours, logits(shared(name)), rel=1e-2, why="live prefixes / soft prompt")
    assert_close(ours, theirs, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")


GROUPED_MM = "transformers.grouped_mm_fallback.default"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_merged_experts_lora_exports_to_onnx_runtime(name, tmp_path):
    """The experts run as transformers' grouped matmul (a custom op); its lowering gives ONNX Runtime the
    torch outputs, on the export's own check (3 rows of 11 tokens, a padded one) and on one token, where
    top-2 of 4 experts leaves two experts without rows. One layer: the export's time is torch's
    decomposition of the MoE block, the same in every layer."""
    compiled = peftc.compile(fresh(name, layers=1), "lora experts, q, v r=4 alpha=8", seed=0)
    randomize_adapters(compiled, seed=1, scale=0.2)
    merged = compiled.merge()
    assert GROUPED_MM in {str(n.target) for n in merged.graph_module.graph.nodes}
    result = peftc.export_onnx(merged, tmp_path / "moe.onnx")
    assert_export_close(result)
    session = ort.InferenceSession(str(tmp_path / "moe.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.tensor([[5]])
    feed = {i.name: (ids if i.name == "input_ids" else torch.ones_like(ids)).numpy() for i in session.get_inputs()}
    with torch.no_grad():
        expected = merged(ids, torch.ones_like(ids))
    assert_close(session.run(None, feed)[0], expected, rel=ONNX_RUNTIME, why="ONNX Runtime's kernels")


@pytest.mark.parametrize("spec, hf_config", [
    ("lora up, down r=4 alpha=8", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"])),
    ("ia3 up, down", lambda: peft.IA3Config(target_modules=["up_proj", "down_proj"],
                                            feedforward_modules=["down_proj"])),
])
def test_up_and_down_on_an_moe_block_are_its_dense_mlp_as_in_hf_peft(spec, hf_config, tmp_path):
    """On Qwen2-MoE the MLP role words name the shared expert's linears, never the stacked experts: what HF
    PEFT 0.21's target_modules=["up_proj", "down_proj"] adapts on it (IA3: down scales its input). Both ways
    through the files; the adapters are given live values first (IA3's ones and LoRA's zero B are the base)."""
    compiled = peftc.compile(shared("qwen2_moe"), spec, seed=0)
    assert [r.site.path for r in compiled.records] == [f"model.layers.{i}.mlp.shared_expert.{p}_proj"
                                                      for i in range(2) for p in ("up", "down")]
    randomize_adapters(compiled, seed=1, scale=0.3)
    if spec.startswith("ia3"):          # scales around one, as trained IA3 vectors are
        with torch.no_grad():
            for param in compiled.adapter_parameters().values():
                param.add_(1.0)
    ours = logits(compiled)
    assert_differs(ours, logits(shared("qwen2_moe")), rel=100 * SAME_FUNCTION, why="live adapters")
    compiled.save_hf_peft(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(fresh("qwen2_moe"), str(tmp_path / "ours")).eval()
    assert_close(ours, logits(theirs), rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
    assert not [m for m in theirs.modules() if type(m).__name__ == "ParamWrapper"]    # no expert adapted

    hf = peft.get_peft_model(fresh("qwen2_moe"), hf_config())
    randomize_adapters_hf(hf)
    hf.save_pretrained(tmp_path / "theirs")
    loaded = peftc.load_hf_peft(shared("qwen2_moe"), tmp_path / "theirs")
    assert [r.site.path for r in loaded.records] == [r.site.path for r in compiled.records]
    assert_close(logits(loaded), logits(hf), rel=SAME_FUNCTION, why="HF PEFT's files read into peftc's spec")


def randomize_adapters_hf(hf) -> None:
    """HF PEFT's LoRA B and IA3 vectors start as the base model: give every trainable tensor live values."""
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("spec, words", [
    ("lora up, down", ("no 'up' linears", "stacked expert weights (model.layers.0.mlp.experts.gate_up_proj",
                       "which 'lora experts' adapts")),
    ("ia3 down", ("no 'down' linears", "which only lora adapts ('lora experts')")),
    ("ia3 experts", ("ia3 on the stacked expert weights is not supported yet",
                     "as HF PEFT 0.21 does only with a LoRA")),
])
def test_where_the_mlps_are_only_experts_the_error_names_them(spec, words):
    """Mixtral's MLPs are only stacked expert weights: HF PEFT 0.21's target_modules=["up_proj", "down_proj"]
    matches nothing there (its w1/w2/w3 map onto the stacked weights, as 'lora experts'), and its IA3 has no
    target_parameters; peftc refuses and says which part of the model the words could not reach."""
    with pytest.raises(peftc.SpecError) as info:
        peftc.compile(shared("mixtral"), spec)
    message = str(info.value)
    assert all(w in message for w in words), message
