"""One spec, every architecture: roles from dataflow, fused projections sliced, HF PEFT as the oracle."""
import json

import pytest
import torch
from peft import PeftModel

import peftc
from peftc.cli import main
from conftest import randomize_adapters, token_ids
from numerics import SAME_FUNCTION, assert_close, assert_differs

ARCHS = ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-phi3", "tiny-neox", "tiny-opt", "tiny-falcon"]
SPECS = ["lora q, v r=4 alpha=8", "lora attn r=2 alpha=4", "lora ffn r=3 alpha=6 rslora=true",
         "lora all-linear r=2 alpha=8"]


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# LLaMA's `lora q, v` and `lora all-linear` against HF PEFT are cells of test_matrix.py
CASES = [(ref, spec) for ref in ARCHS for spec in SPECS
         if not (ref == "tiny-llama" and spec.startswith(("lora q, v", "lora all-linear")))]


@pytest.mark.parametrize("ref, spec", CASES)
@pytest.mark.slow
def test_hf_peft_gives_the_same_outputs_from_our_files(ref, spec, tiny, tmp_path):
    model = peftc.compile(tiny(ref), spec)
    randomize_adapters(model, scale=0.1)
    model.save_hf_peft(tmp_path)
    ids = token_ids(seq=10)
    with torch.no_grad():
        ours = model(ids)
    theirs = outputs(PeftModel.from_pretrained(peftc.load_model(ref), str(tmp_path)).eval(), ids)
    base = outputs(tiny(ref), ids)
    assert_differs(ours, base, rel=1e-3, why="live adapters")  # the adapters are live
    assert_close(ours, theirs, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
    with torch.no_grad():
        assert_close(model.merge()(ids), ours, rel=SAME_FUNCTION, why="a merged weight: one rounding, another order")
    back = peftc.load_hf_peft(peftc.load_model(ref), tmp_path)   # and HF PEFT's files load back
    with torch.no_grad():
        assert_close(back(ids), ours, rel=SAME_FUNCTION, why="the same weights through another load path")


def fused(ref, path_part):
    sites = peftc.compiler.compiled.prepare(peftc.load_model(ref)).sites
    return next(s for s in sites.linears if path_part in s.path and s.layer == 1)


@pytest.mark.slow
def test_fused_slices_follow_the_dataflow():
    c_attn = fused("tiny-gpt2", "c_attn")
    assert c_attn.role == "qkv"
    assert {r: (f[0], f[-1] + 1, len(f)) for r, f in c_attn.slices.items()} == \
        {"q": (0, 64, 64), "k": (64, 128, 64), "v": (128, 192, 64)}
    qkv = fused("tiny-phi3", "qkv_proj")            # grouped-query: 4 query heads, 2 key/value heads
    assert {r: (f[0], f[-1] + 1, len(f)) for r, f in qkv.slices.items()} == \
        {"q": (0, 64, 64), "k": (64, 96, 32), "v": (96, 128, 32)}
    gate_up = fused("tiny-phi3", "gate_up_proj")
    assert gate_up.role == "gate_up"
    assert gate_up.slices["gate"] == tuple(range(128)) and gate_up.slices["up"] == tuple(range(128, 256))
    neox = fused("tiny-neox", "query_key_value")     # per head: [q(16) k(16) v(16)] x 4 heads
    assert neox.slices["q"] == tuple(i for h in range(4) for i in range(48 * h, 48 * h + 16))
    assert neox.slices["v"] == tuple(i for h in range(4) for i in range(48 * h + 32, 48 * h + 48))


@pytest.mark.parametrize("name, build, expected", [
    # Bloom: per-head interleaved q|k|v, eager attention through baddbmm with ALiBi
    ("bloom", lambda T: T.BloomForCausalLM(T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)),
     {"q": "0:16 every 48 x4", "k": "16:32 every 48 x4", "v": "32:48 every 48 x4"}),
    # CodeGen: its fused projection holds q, v, k in that order, interleaved in groups
    ("codegen", lambda T: T.CodeGenForCausalLM(T.CodeGenConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                                vocab_size=128)),
     {"q": "0:16 every 48 x4", "k": "32:48 every 48 x4", "v": "16:32 every 48 x4"}),
    # GPT-BigCode with multi-query attention: one key and one value head
    ("gpt_bigcode", lambda T: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4,
                                                                          multi_query=True, vocab_size=128)),
     {"q": "0:64", "k": "64:80", "v": "80:96"}),
])
def test_fused_layouts_of_other_architectures(name, build, expected):
    import transformers
    from peftc.graph.analysis import analyze
    from peftc.graph.capture import capture
    from peftc.graph.slices import describe
    torch.manual_seed(0)
    sites = analyze(capture(build(transformers)).gm)
    fused_sites = [s for s in sites.linears if s.slices]
    assert len(fused_sites) == 2 and all(s.role == "qkv" for s in fused_sites)
    assert {r: describe(f) for r, f in fused_sites[0].slices.items()} == expected
    assert not [s.path for s in sites.linears if s.role is None]


def test_gpt2_lora_q_v_changes_q_and_v_and_leaves_k_untouched(tiny):
    model = peftc.compile(tiny("tiny-gpt2"), "lora q, v r=4")
    randomize_adapters(model)
    base = tiny("tiny-gpt2").transformer.h[0].attn.c_attn
    merged = model.merge().graph_module
    weight = merged.get_parameter("hf.transformer.h.0.attn.c_attn.weight")    # Conv1D: in x out
    changed = (weight - base.weight).abs().amax(dim=0)
    assert (changed[0:64] > 0).all() and (changed[128:192] > 0).all()
    assert (changed[64:128] == 0).all()
    ids = token_ids()                                 # and in a forward pass: the k outputs are the base's
    x = tiny("tiny-gpt2").transformer.wte(ids) + tiny("tiny-gpt2").transformer.wpe(torch.arange(12))
    h = tiny("tiny-gpt2").transformer.h[0].ln_1(x)
    with torch.no_grad():
        merged_out = h @ weight + base.bias
        base_out = base(h)
    assert torch.equal(merged_out[..., 64:128], base_out[..., 64:128])
    assert_differs(merged_out[..., :64], base_out[..., :64], rel=1e-3, why="live adapters")
    trainable = sum(p.numel() for p in model.adapter_parameters().values())
    assert trainable == 4 * 2 * (4 * 64 + 64 * 4)     # per layer: a rank-4 LoRA for q and one for v


@pytest.mark.slow
def test_two_statements_on_one_fused_projection_export_as_one_lora(tiny, tmp_path):
    model = peftc.compile(tiny("tiny-phi3"), "lora q r=2 alpha=4\nlora v, up r=4 alpha=2 rslora=true")
    randomize_adapters(model)
    model.save_hf_peft(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 6                           # q (2) and v (4) on qkv_proj: one rank-6 LoRA
    assert config["rank_pattern"] == {rf"model\.layers\.{i}\.mlp\.gate_up_proj": 4 for i in range(4)}
    ids = token_ids()
    with torch.no_grad():
        ours = model(ids)
    theirs = outputs(PeftModel.from_pretrained(peftc.load_model("tiny-phi3"), str(tmp_path)).eval(), ids)
    assert_close(ours, theirs, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
    again = peftc.compile(tiny("tiny-phi3"), model.spec)      # what `peftc export` does with the files
    again.load_adapter(tmp_path)
    with torch.no_grad():
        assert_close(again(ids), ours, rel=SAME_FUNCTION, why="the same weights through another load path")


def test_dense_file_does_not_load_into_slices(tiny, tmp_path):
    whole = peftc.compile(tiny("tiny-gpt2"), 'lora "transformer.h.*.attn.c_attn" r=8')
    randomize_adapters(whole)
    whole.save_hf_peft(tmp_path)
    sliced = peftc.compile(tiny("tiny-gpt2"), "lora q, v r=4")
    with pytest.raises(peftc.AdapterError, match="non-zero outside the q, v slices"):
        sliced.load_adapter(tmp_path)


@pytest.mark.parametrize("ref, lines", [
    ("tiny-llama", ["-  embed    model.embed_tokens  512 x 64  embedding",
                    "0  q        model.layers.0.self_attn.q_proj  64 x 64  linear",
                    "3  down     model.layers.3.mlp.down_proj  64 x 128  linear",
                    "-  head     lm_head  512 x 64  linear"]),
    ("tiny-gpt2", ["0  qkv      transformer.h.0.attn.c_attn  192 x 64  conv1d  q 0:64 | k 64:128 | v 128:192",
                   "0  up       transformer.h.0.mlp.c_fc  256 x 64  conv1d"]),
    ("tiny-bert", ["2  v        encoder.layer.2.attention.self.value  64 x 64  linear",
                   "2  o        encoder.layer.2.attention.output.dense  64 x 64  linear",
                   "2  up       encoder.layer.2.intermediate.dense  128 x 64  linear"]),
    ("tiny-phi3", ["1  qkv      model.layers.1.self_attn.qkv_proj  128 x 64  linear  q 0:64 | k 64:96 | v 96:128",
                   "1  gate_up  model.layers.1.mlp.gate_up_proj  256 x 64  linear  gate 0:128 | up 128:256"]),
    ("tiny-neox", ["0  qkv      gpt_neox.layers.0.attention.query_key_value  192 x 64  linear  "
                   "q 0:16 every 48 x4 | k 16:32 every 48 x4 | v 32:48 every 48 x4"]),
    ("tiny-falcon", ["2  qkv      transformer.h.2.self_attention.query_key_value  96 x 64  matmul  "
                     "q 0:64 | k 64:80 | v 80:96"]),
    ("tiny-opt", ["-  embed    model.decoder.embed_tokens  512 x 64  embedding",
                  "1  o        model.decoder.layers.1.self_attn.out_proj  64 x 64  linear",
                  "1  up       model.decoder.layers.1.fc1  128 x 64  linear"]),
])
@pytest.mark.slow
def test_inspect_shows_roles_and_fused_slices(ref, lines, capsys):
    assert main(["inspect", ref]) == 0
    out = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    for line in lines:
        assert " ".join(line.split()) in out, line
