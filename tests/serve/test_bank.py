"""Several adapters on one base (peftc.serve.bank): a mixed-task batch, each row with its own adapter, equals
HF PEFT's mixed batch for LoRA rows, and each adapter's own model run alone for IA3, prompt and prefix rows
(HF PEFT has no mixed batch for those; prompt and prefix rows equal HF PEFT's single adapter too). The ONNX
mixed-task decoder greedy-decodes what each adapter's own model decodes."""
import numpy as np
import pytest
import torch
from peft import PeftModel

import peftc
from conftest import randomize_adapters, token_ids
from numerics import SAME_FUNCTION, assert_close, assert_differs
from peftc.errors import PeftcError
from peftc.rundir import write_compiled
from peftc.serve.bank import AdapterBank
from peftc.serve.bank_onnx import OnnxEngine
from peftc.serve.engine import BASE, Engine
from peftc.serve.rows import join_starts

#: tiny-llama adapters: IA3 (outputs, and a down projection's input), LoRA with IA3 in one spec, soft prompts
#: and prefixes of two lengths each
LLAMA_SPECS = {"ia3": "ia3 k, v, down", "mix": "lora o r=2\nia3 up", "prompt3": "prompt tokens=3",
               "prompt5": "prompt tokens=5", "prefix2": "prefix tokens=2", "prefix4": "prefix tokens=4"}
#: tiny-gpt2 LoRAs: q and v slices of the fused c_attn, two statements (one rsLoRA) on those slices, and the
#: attention and MLP output projections at another rank and alpha
GPT2_SPECS = {"qv": "lora q, v r=4", "two": "lora q r=2\nlora v r=4 alpha=16 rslora=true",
              "out": "lora o, down r=8 alpha=4"}


def run_dirs(root, ref: str, base, specs: dict[str, str]) -> tuple[dict, dict]:
    """Each spec compiled on ``base`` with live (random, non-zero) weights and written as 'peftc compile
    --out' writes it; returns ({name: directory}, {name: the compiled model})."""
    dirs, models = {}, {}
    for i, (name, spec) in enumerate(specs.items()):
        model = peftc.compile(base, spec, seed=0)
        randomize_adapters(model, seed=i + 1, scale=0.3)
        write_compiled(root / name, model, model.spec, ref, model.report())
        dirs[name], models[name] = root / name, model
    return dirs, models


def padded_batch(rows: int, seq: int = 7, seed: int = 1):
    """Token ids and a mask with left-padded rows (every other row loses 1..3 leading positions)."""
    ids = token_ids(batch=rows, seq=seq, vocab=200, seed=seed)
    mask = torch.ones_like(ids)
    for row in range(1, rows, 2):
        mask[row, :1 + row % 3] = 0
    return ids, mask


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = peftc.load_model("tiny-llama")
    dirs, models = run_dirs(root, "tiny-llama", base, LLAMA_SPECS)
    return base, dirs, models, AdapterBank.load(base, dirs), root


def alone(model, row: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(row[None])
    return (out.logits if hasattr(out, "logits") else out)[0]


@pytest.mark.slow
def test_lora_rows_equal_hf_peft_mixed_batch(tmp_path):
    """HF PEFT loads each of peftc's LoRA directories as a named adapter and runs the batch with
    adapter_names; the bank's rows (left padding included, positions from the mask) give its logits, in torch
    and from the bank's ONNX decoder."""
    base = peftc.load_model("tiny-gpt2")
    dirs, _ = run_dirs(tmp_path, "tiny-gpt2", base, GPT2_SPECS)
    bank = AdapterBank.load(base, dirs)
    names = [BASE, "qv", "two", "out", "qv", BASE, "out", "two"]
    ids, mask = padded_batch(len(names))
    ours = bank.forward(ids, mask, names)
    hf = PeftModel.from_pretrained(peftc.load_model("tiny-gpt2"), str(dirs["qv"]), adapter_name="qv").eval()
    for name in ("two", "out"):
        hf.load_adapter(str(dirs[name]), adapter_name=name)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=names).logits
        plain = base(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    keep = mask.bool()
    assert_close(ours[keep], theirs[keep], rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order")
    adapted = torch.tensor([n != BASE for n in names])
    assert_differs(ours[adapted][keep[adapted]], plain[adapted][keep[adapted]], rel=1e-2, why="live adapters")
    assert_close(ours[~adapted][keep[~adapted]], plain[~adapted][keep[~adapted]], rel=SAME_FUNCTION,
                 why="base rows gather zero factors")
    # the exported decoder on the same batch: GPT-2's Conv1D reads flattened (batch · sequence) inputs, which
    # the stacked branches view per row
    bank.export_onnx(tmp_path / "onnx")
    engine = OnnxEngine(tmp_path / "onnx")
    past, start = join_starts(engine, names)
    onnx_logits, _ = engine(ids.numpy(), np.concatenate([start, mask.numpy()], 1), past, engine.task_ids(names))
    assert_close(torch.from_numpy(onnx_logits)[keep], theirs[keep], rel=SAME_FUNCTION,
                 why="ONNX Runtime's kernels and HF PEFT's modules sum in other orders")


@pytest.mark.slow
def test_ia3_prompt_prefix_rows_equal_each_adapter_alone(llama):
    """Rows of every method and of two prompt and prefix lengths in one left-padded batch: each equals its
    adapter's own compiled model on the row's tokens alone; prompt and prefix rows equal HF PEFT's."""
    base, dirs, models, bank, _ = llama
    names = [BASE, *LLAMA_SPECS, "prefix4", "prompt3"]
    ids, mask = padded_batch(len(names))
    ours = bank.forward(ids, mask, names)
    hf = {}
    for row, name in enumerate(names):
        tokens = ids[row][mask[row].bool()]
        got = ours[row][mask[row].bool()]
        own = alone(base if name == BASE else models[name], tokens)
        assert_close(got, own, rel=SAME_FUNCTION, why="a cached step sums over the past in another order",
                     name=name)
        if name != BASE:
            assert_differs(got, alone(base, tokens), rel=1e-2, why="live adapters", name=name)
        if name.startswith(("prompt", "prefix")):
            hf.setdefault(name, PeftModel.from_pretrained(peftc.load_model("tiny-llama"), str(dirs[name])).eval())
            theirs = alone(hf[name], tokens)[-len(tokens):]     # HF PEFT returns the prompt's positions too
            assert_close(got, theirs, rel=SAME_FUNCTION, why="HF PEFT's modules sum in another order", name=name)


def test_the_base_is_held_once(llama):
    """Every base weight the bank's decoder reads is the model's own tensor (no copy per adapter); what the
    bank adds is the stacked factors and scales only."""
    base, _, _, bank, _ = llama
    held = {t.data_ptr() for t in list(bank.decoder.gm.parameters()) + list(bank.decoder.gm.buffers())}
    own = {p.data_ptr() for p in base.parameters()}
    assert own <= held
    extra = sum(b.numel() for name, b in bank.decoder.gm.named_buffers() if name.startswith("peftc_bank_"))
    assert extra < 0.1 * sum(p.numel() for p in base.parameters())


@pytest.mark.slow
def test_onnx_mixed_decoder_decodes_what_each_adapter_decodes(llama):
    """The exported decoder (task_ids, one per row) greedy-decodes a left-padded mixed batch, step by step
    with its cache, into each row's tokens from its adapter's own model decoding alone without a cache."""
    base, _, models, bank, root = llama
    result = bank.export_onnx(root / "bank")
    engine = OnnxEngine(root / "bank")
    assert isinstance(engine, Engine) and engine.names == bank.names == [BASE, *LLAMA_SPECS]
    assert result.max_rel_diff < 1e-4
    names = [BASE, *LLAMA_SPECS]
    prompts = [[5, 9, 17, 33, 102, 7], [40, 41, 42], [30, 12, 99, 14], [8, 8], [101, 7, 64, 3, 9], [60, 61, 2, 4],
               [11, 12, 13]]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], np.int64)
    mask = (np.arange(width)[None] >= width - np.array([len(p) for p in prompts])[:, None]).astype(np.int64)
    past, start = join_starts(engine, names)
    mask = np.concatenate([start, mask], 1)
    task_ids, tokens = engine.task_ids(names), []
    for _ in range(6):
        logits, past = engine(ids, mask, past, task_ids)
        tokens.append(logits[:, -1].argmax(-1))
        ids, mask = tokens[-1][:, None], np.concatenate([mask, np.ones((len(names), 1), np.int64)], 1)
    tokens = np.stack(tokens, 1)
    for row, (name, prompt) in enumerate(zip(names, prompts)):
        seq = torch.tensor(prompt)
        model = base if name == BASE else models[name]
        for _ in range(6):
            seq = torch.cat([seq, alone(model, seq)[-1].argmax(-1, keepdim=True)])
        assert tokens[row].tolist() == seq[len(prompt):].tolist(), name
    with pytest.raises(KeyError):
        engine.start("nope")


def test_methods_a_shared_base_cannot_stack_are_refused(llama, tmp_path):
    """A bottleneck adapter, bitfit, or a prefix on some layers only: one line naming the directory and the
    statement; an unknown adapter name is a PeftcError listing the served ones."""
    base, dirs, _, bank, _ = llama
    for name, spec in {"bottleneck": "adapter", "bias": "bitfit", "part": "prefix tokens=2 layers=1..2"}.items():
        model = peftc.compile(base, spec, seed=0)
        write_compiled(tmp_path / name, model, model.spec, "tiny-llama", model.report())
        with pytest.raises(PeftcError) as caught:
            AdapterBank.load(base, {"ia3": dirs["ia3"], name: tmp_path / name})
        message = str(caught.value)
        assert str(tmp_path / name) in message and f"'{model.spec.statements[0]}'" in message
        assert "\n" not in message
    with pytest.raises(PeftcError, match="unknown adapter 'nope'"):
        bank.forward(token_ids(1, 4, vocab=100), None, ["nope"])
