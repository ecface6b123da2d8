"""Switching LoRA adapters at run time on one ONNX decoder: ``peftc export RUN --genai OUT --adapter-inputs`` and
``peftc export RUN2 --onnx-adapter FILE --for OUT``. With each run's ``.onnx_adapter`` active, ONNX Runtime
(``RunOptions.add_active_adapter``) gives that run's merged model's logits as transformers computes them, and
onnxruntime-genai (``og.Adapters``) its greedy tokens; with none active, the base model's. The two runs differ
in rank and in sites (the second adapts fewer), and their B matrices are non-zero."""
import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime_genai as og
import pytest
import torch

import peftc
from conftest import randomize_adapters
from numerics import ONNX_RUNTIME, SAME_FUNCTION, assert_close, assert_differs
from peftc.cli import main
from peftc.errors import ExportError
from peftc.export.adapters import export_onnx_adapter
from peftc.export.hf import hf_from_merged
from peftc.rundir import write_compiled

SPECS = {"run1": "lora q, v, down r=4 alpha=8", "run2": "lora q, v r=2 alpha=4"}
PROMPTS = [[5, 9, 17, 33, 102, 7, 64], [40, 41, 42, 300, 12]]
#: ONNX Runtime's unmerged branch (x @ A @ sB added to W x) against transformers on the merged weight
#: (W + sBA) x: the same function in another order (SAME_FUNCTION) run by other kernels (ONNX_RUNTIME)
TOLERANCE = SAME_FUNCTION + ONNX_RUNTIME


@pytest.fixture(scope="module")
def base():
    """tiny-llama, one object for every compile here (they share its capture)."""
    return peftc.load_model("tiny-llama")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, base):
    """Two run directories with random non-zero adapters, exported through the CLI: OUT with run1's adapter
    inputs and file, then run2's file for it. Returns (OUT, {run: its merged model in transformers})."""
    root = tmp_path_factory.mktemp("switch")
    merged = {}
    for seed, (name, spec) in enumerate(SPECS.items(), 1):
        model = peftc.compile(base, spec, seed=0)
        randomize_adapters(model, seed=seed, scale=0.3)
        write_compiled(root / name, model, model.spec, "tiny-llama", model.report())
        merged[name] = hf_from_merged(model.merge())
    out = root / "out"
    assert main(["export", str(root / "run1"), "--genai", str(out), "--adapter-inputs"]) == 0
    assert main(["export", str(root / "run2"), "--onnx-adapter", str(out / "adapters" / "run2.onnx_adapter"),
                 "--for", str(out)]) == 0
    return out, merged


def _prefill(session, prompt, adapter=None) -> np.ndarray:
    """ONNX Runtime's logits over the whole prompt (an empty cache), with ``adapter`` active."""
    feeds = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64)}
    for value in session.get_inputs()[2:]:
        feeds[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), np.float32)
    options = ort.RunOptions()
    if adapter is not None:
        options.add_active_adapter(adapter)
    return session.run(["logits"], feeds, options)[0]


def _generate(hf, prompt, new: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_onnx_runtime_switches_adapters_per_run(exported, base):
    """One session: each adapter active gives its merged model's logits; none active, the base model's."""
    out, merged = exported
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    adapters = {}
    for name in merged:
        adapters[name] = ort.LoraAdapter()
        adapters[name].Load(str(out / "adapters" / f"{name}.onnx_adapter"))
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = {name: hf(ids).logits.numpy() for name, hf in merged.items()}
            plain = base(ids).logits.numpy()
        for name, adapter in adapters.items():
            got = _prefill(session, prompt, adapter)
            assert_close(got, expected[name], rel=TOLERANCE, why="unmerged in ONNX Runtime vs merged in torch",
                         name=name)
            assert_differs(got, plain, rel=1e-2, why="a random adapter moves the logits", name=name)
        assert_close(_prefill(session, prompt), plain, rel=ONNX_RUNTIME, why="ONNX Runtime's kernels, no adapter")
    assert_differs(expected["run1"], expected["run2"], rel=1e-2, why="two different adapters")


@pytest.mark.slow
def test_genai_switches_adapters_per_generator(exported, base):
    """onnxruntime-genai loads both files on one model; each generator decodes as generate() does with its
    adapter merged, and one with no adapter active as the base model does."""
    out, merged = exported
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    for name in merged:
        adapters.load(str(out / "adapters" / f"{name}.onnx_adapter"), name)
    cases = dict(merged, none=base)
    tokens = {}
    for name, hf in cases.items():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(PROMPTS[0]) + 10, min_length=len(PROMPTS[0]) + 10, do_sample=False)
        generator = og.Generator(model, params)
        if name != "none":
            generator.set_active_adapter(adapters, name)
        generator.append_tokens(PROMPTS[0])
        tokens[name] = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens[name].append(int(generator.get_next_tokens()[0]))
        assert tokens[name] == _generate(hf, PROMPTS[0], 10), name
    assert len({tuple(t) for t in tokens.values()}) == 3, "each adapter (and none) decodes differently"


@pytest.mark.slow
def test_inputs_are_named_by_site_with_a_rank_axis(exported):
    """The factors are graph inputs named by the adapter parameters, their rank a named axis, each with a
    rank-0 initializer of its name (the default); the adapter file holds A and scale * B as they are fed."""
    out, _ = exported
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    site = "model.layers.1.mlp.down_proj"
    assert inputs[f"{site}.lora_A"] == [128, f"{site}.rank"]
    assert inputs[f"{site}.lora_B"] == [f"{site}.rank", 64]
    assert sum(name.endswith(".lora_A") for name in inputs) == 3 * 4
    defaults = {i.name: list(i.dims) for i in graph.initializer if i.name in inputs}
    assert defaults[f"{site}.lora_A"] == [128, 0] and len(defaults) == 2 * 3 * 4
    params = ort.AdapterFormat.read_adapter(str(out / "adapters" / "run2.onnx_adapter")).get_parameters()
    assert params["model.layers.0.self_attn.q_proj.lora_A"].shape() == [64, 2]
    assert not any("down_proj" in name for name in params)


@pytest.mark.slow
def test_a_mismatched_adapter_is_refused(exported, base, tmp_path, capsys):
    """A run adapting a site the model has no input for is refused in one line naming the site and the file,
    and nothing is written; --onnx-adapter without --for is refused before anything is loaded."""
    out, _ = exported
    other = peftc.compile(base, "lora q, k r=2", seed=0)
    target = tmp_path / "k.onnx_adapter"
    with pytest.raises(ExportError) as error:
        export_onnx_adapter(other, target, out, where="runk")
    message = str(error.value)
    assert "\n" not in message and "model.layers.0.self_attn.k_proj" in message and "model.onnx" in message
    assert not target.exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ExportError, match="no model.onnx"):
        export_onnx_adapter(other, target, plain)
    capsys.readouterr()
    assert main(["export", str(out), "--onnx-adapter", str(target)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--for DIR" in err
