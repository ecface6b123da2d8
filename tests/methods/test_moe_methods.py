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
