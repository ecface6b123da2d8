"""The architecture matrix: every method on every architecture users fine-tune, each cell a test of what
:data:`MATRIX` declares for it. ``hf-peft``: peftc's own files (``save_hf_peft``), loaded by HF PEFT onto a
fresh copy of the base, give peftc's outputs; ``eager``: HF PEFT cannot run the cell (it crashes or refuses),
so peftc's outputs are compared with the model's own attention extended by the prefixes read back from
peftc's file in HF PEFT's layout; ``refused``: peftc refuses the spec with a clear error. ``merge+ONNX``:
the merged LoRA equals HF PEFT's ``merge_and_unload()`` and its ONNX export matches torch in ONNX Runtime.
The README's table is generated from :data:`MATRIX` (:func:`readme_table`, checked by test_matrix_table.py)."""
import functools
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

import peftc
from conftest import randomize_adapters
from matrix_models import ENCODER_DECODERS, SIGNATURES, build, inputs, output
from numerics import SAME_FUNCTION, assert_close, assert_differs, assert_export_close

pytestmark = pytest.mark.slow

HF, EAGER, REFUSED = "hf-peft", "eager", "refused"
#: the column -> the spec each cell compiles
METHODS = {"lora q, v": "lora q, v r=4 alpha=8", "lora all-linear": "lora all-linear r=2 alpha=4",
           "ia3": "ia3 k, v, down", "prompt": "prompt tokens=3", "prefix": "prefix tokens=3",
           "merge+ONNX": "lora q, v r=4 alpha=8"}
TOKENS = 3


def row(**cells: str) -> dict[str, str]:
    """A row of the matrix: HF PEFT's outputs in every column but those named (prompt="refused"...)."""
    named = {key.replace("_", " "): value for key, value in cells.items()}
    return {method: named.get(method, HF) for method in METHODS}


#: arch -> column -> what its test asserts
MATRIX = {
    **{arch: row() for arch in ("LLaMA", "Qwen2", "Qwen3", "Mistral", "Gemma", "Gemma2", "Gemma3", "Phi",
                                "StableLM", "OLMo2", "Cohere", "Granite", "SmolLM3", "GPT-J", "Bloom", "CodeGen",
                                "GPT-BigCode")},
    "Mixtral": row(ia3=REFUSED), "Qwen2-MoE": row(), "Qwen3-MoE": row(ia3=REFUSED),
    "RoBERTa": row(), "DeBERTa-v2": row(prefix=REFUSED), "ModernBERT": row(prefix=EAGER),
    "DistilBERT": row(prefix=EAGER),
    "T5": row(), "BART": row(), "ViT": row(prompt=REFUSED, prefix=EAGER),
    "Whisper": row(prompt=REFUSED, prefix=EAGER),
}
#: why a cell is not HF PEFT's, and for a refused one the words of peftc's error
MOE_IA3 = ("the MLPs are only stacked expert weights, which ia3 does not reach (HF PEFT's IA3 has no "
           "target_parameters)", "no 'down' linears: its MLPs are stacked expert weights")
NO_IDS = ("HF PEFT crashes (its encoder-decoder forward asks for input_ids or inputs_embeds; Whisper takes "
          "input_features); the reference is the model fed the cache HF PEFT's own get_prompt builds", None)
NO_PAST = ("HF PEFT loads the file but crashes: the model takes no past_key_values, so its lengthened mask "
           "meets unlengthened keys", None)
NO_TOKENS = ("no token embedding (the inputs are pixels or audio features) for a soft prompt",
             "prompt needs a model whose graph looks up a token embedding with input_ids")
REASONS = {
    ("Mixtral", "ia3"): MOE_IA3, ("Qwen3-MoE", "ia3"): MOE_IA3,
    ("DeBERTa-v2", "prefix"): ("its scores add relative-position terms from q and k, which a prefix position "
                               "has none of", "prefix cannot rewrite the attention at encoder.layer.0"),
    ("ModernBERT", "prefix"): NO_PAST, ("DistilBERT", "prefix"): NO_PAST,
    ("Whisper", "prefix"): NO_IDS,
    ("ViT", "prompt"): NO_TOKENS, ("Whisper", "prompt"): NO_TOKENS,
    ("ViT", "prefix"): ("HF PEFT refuses to load a prefix onto a model without a vocabulary "
                        "(it reads config.vocab_size)", None),
}
SYMBOLS = {HF: "✓", EAGER: "e", REFUSED: "–"}


def readme_table() -> str:
    """The README's table: architectures with the same cells share a row."""
    groups: dict[tuple, list[str]] = {}
    for arch, cells in MATRIX.items():
        groups.setdefault(tuple(cells.values()), []).append(arch)
    lines = ["| architecture | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    lines += [f"| {', '.join(archs)} | " + " | ".join(SYMBOLS[c] for c in cells) + " |"
              for cells, archs in groups.items()]
    return "\n".join(lines) + "\n"


CELLS = [(arch, method) for arch, cells in MATRIX.items() for method in cells]
IDS = [f"{arch}-{method}".replace(", ", ",").replace(" ", "_") for arch, method in CELLS]   # LLaMA-lora_q,v


@pytest.fixture(autouse=True)
def _on_one_thread(one_thread):
    """Tiny models run fastest on one thread: 41% less time for a fifth of the cells on a busy 2-core
    machine (53 s against 90 s)."""


@functools.lru_cache(maxsize=None)
def shared(arch: str):
    """peftc's side of every cell of a row: one model (compiling never changes it, its capture is cached);
    HF PEFT, which wraps the modules it is given, always gets a fresh ``build(arch)``."""
    return build(arch)


def live(model, method: str) -> None:
    """Non-zero adapters, so no cell passes trivially: LoRA factors at 0.2 (larger ones compound through T5's
    unscaled attention), IA3 scales around one as trained ones are, prompts and prefixes N(0, 1) as HF's."""
    randomize_adapters(model, scale={"ia3": 0.3, "prompt": 1.0, "prefix": 1.0}.get(method, 0.2))
    if method == "ia3":
        with torch.no_grad():
            for param in model.adapter_parameters().values():
                param.add_(1.0)


def hf_peft(arch: str, directory, feeds: dict) -> torch.Tensor:
    return output(PeftModel.from_pretrained(build(arch), str(directory)).eval(), feeds)


REFERENCE = "peftc_matrix_prefix_reference"


def prefix_columns(module, mask: torch.Tensor) -> torch.Tensor:
    """The P mask columns of the prefix: visible to every query, but in a (bidirectional) sliding window
    of w (ModernBERT's local layers: a module's ``sliding_window``) real token i at position P + i sees
    prefix position p only while P + i - p < w, as it would see cached keys there."""
    queries = torch.arange(mask.shape[-2]).unsqueeze(1) + TOKENS
    window = getattr(module, "sliding_window", None)
    visible = (queries - torch.arange(TOKENS) < window) if window else torch.ones(len(queries), TOKENS, dtype=bool)
    if mask.dtype != torch.bool:
        visible = torch.where(visible, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)
    return visible.expand(*mask.shape[:-1], TOKENS)


def prefixed_reference(arch: str, directory, feeds: dict) -> torch.Tensor:
    """``arch``'s own attention with the prefixes of peftc's file (HF PEFT's layout: P × layers·2·heads·d,
    as its get_prompt reads it) before every layer's keys and values, the prefix columns visible as
    :func:`prefix_columns` says, and the real tokens at positions P..P+T-1 (what HF PEFT's
    past_key_values would mean)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    flat = load_file(directory / "adapter_model.safetensors")["prompt_embeddings"]
    layers, heads = config["num_layers"], config["num_attention_heads"]
    kv = flat.view(1, TOKENS, 2 * layers, heads, -1).permute(2, 0, 3, 1, 4)   # 2L × 1 × heads × P × d
    calls = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        layer = len(calls) % layers
        calls.append(module)
        pk, pv = (t.expand(query.shape[0], -1, -1, -1) for t in (kv[2 * layer], kv[2 * layer + 1]))
        key, value = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
        if attention_mask is not None:
            attention_mask = torch.cat([prefix_columns(module, attention_mask), attention_mask], -1)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(REFERENCE, attention)
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)
    model = build(arch)
    model.set_attn_implementation(REFERENCE)
    if "input_ids" in feeds:
        seq = feeds["input_ids"].shape[1]
        feeds = dict(feeds, position_ids=torch.arange(TOKENS, TOKENS + seq).expand(feeds["input_ids"].shape[0], -1))
    result = output(model, feeds)
    assert len(calls) == layers, f"the reference ran {len(calls)} attentions, not {layers}"
    return result


def cached_reference(arch: str, directory, feeds: dict) -> torch.Tensor:
    """An encoder-decoder fed, as past_key_values, the cache HF PEFT's get_prompt builds from peftc's file
    (the decoder's self-attention prefixes, an empty cross-attention cache): what HF PEFT's forward does
    with models it can call."""
    peft_model = PeftModel.from_pretrained(build(arch), str(directory)).eval()
    batch = next(iter(feeds.values())).shape[0]
    return output(peft_model.get_base_model(), dict(feeds, past_key_values=peft_model.get_prompt(batch)))


@pytest.mark.parametrize("arch, method", CELLS, ids=IDS)
def test_cell(arch, method, tmp_path):
    claim, spec = MATRIX[arch][method], METHODS[method]
    if claim == REFUSED:
        with pytest.raises(peftc.SpecError, match=REASONS[arch, method][1]):
            peftc.compile(shared(arch), spec)
        return
    feeds = inputs(arch)
    model = peftc.compile(shared(arch), spec, seed=0)
    if arch in SIGNATURES:              # captured with the model's own inputs
        assert (model.signature.names, model.kind) == SIGNATURES[arch]
    live(model, method)
    with torch.no_grad():
        ours = model(**feeds)
    base = output(shared(arch), feeds)
    # the adapters move these outputs by 1.1e-3 (ModernBERT's IA3) to 1.9 (OLMo2's prefix) of their largest
    # value: over ten times the bound of the comparisons below, which a cell ignoring them would then fail
    assert_differs(ours, base, rel=10 * SAME_FUNCTION, why="live adapters, far over the comparison's bound")
    model.save_hf_peft(tmp_path)
    if claim == EAGER:
        reference = cached_reference if arch in ENCODER_DECODERS else prefixed_reference
        expected = reference(arch, tmp_path, feeds)
    elif method == "merge+ONNX":
        merged = model.merge()
        hf = PeftModel.from_pretrained(build(arch), str(tmp_path)).merge_and_unload().eval()
        assert_close(merged(**feeds), output(hf, feeds), rel=SAME_FUNCTION,
                     why="both fold B·A into the weight once, summed in another order")
        assert_export_close(peftc.export_onnx(merged, tmp_path / "merged.onnx"))
        return
    else:
        expected = hf_peft(arch, tmp_path, feeds)
        if method == "prompt" and arch not in ENCODER_DECODERS:   # HF PEFT returns the P prompt positions too
            assert expected.shape[1] == ours.shape[1] + TOKENS
            expected = expected[:, TOKENS:]
    assert_close(ours, expected, rel=SAME_FUNCTION, why="HF PEFT's modules (or the reference's concatenated "
                                                         "prefixes) sum in another order")
