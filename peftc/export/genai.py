"""``peftc export DIR --genai OUT/``: a KV-cache ONNX decoder that ONNX Runtime GenAI runs.

OUT holds ``model.onnx`` (and ``model.onnx.data`` past 1 GiB of weights), ``genai_config.json`` and the
tokenizer's files. The decoder is :func:`peftc.export.kvcache.cache_decoder` of the export target's model
(fp32, fp16, nf4 or int4, as :mod:`peftc.export.targets` builds it), so whatever stays a graph op after
merging (a prefix, a bottleneck adapter) stays in the file. Inputs ``input_ids`` (batch, sequence),
``attention_mask`` (batch, total_sequence), ``past_key_values.{i}.key/value`` (batch, kv heads,
past_sequence, head dim); outputs ``logits`` and ``present.{i}.key/value`` (..., total_sequence, ...).

The directory takes its name only once the file decodes correctly (:func:`verify_decoder`): greedy decoding
in ONNX Runtime, with its cache, gives at every step the torch decoder's logits on a left-padded batch, and
the torch model's without a cache on each prompt alone; and, when the merge folded every adapter into a
float32 base, the batch's tokens are those ``transformers``' ``generate()`` gives on the merged weights."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from peftc.errors import ExportError, PeftcError
from peftc.export.kvcache import CacheDecoder, CacheLayout, cache_decoder
from peftc.export.onnx import _convert, load_session, providers, quiet
from peftc.export.hf import TOKENIZER_FILES, hf_from_merged
from peftc.export.targets import target_model
from peftc.fsutil import atomic_dir, write_json
from peftc.models import resolve

MODEL_FILE = "model.onnx"
#: what the directory was exported from: {"model": reference, "target": ...}; generate/eval read the tokenizer
ORIGIN_FILE = "peftc.json"
#: the ONNX Runtime decoder must give the torch model's logits within this fraction of the largest logit at
#: every step. It runs the same float32 graph, but a cached step sums in another order than the whole
#: sequence (S=1 matmuls, attention over the cache): merged LoRA on SmolLM2-135M measured 1.8e-6, its int4
#: decoder 1.8e-5, and a random N(0, 1) prefix of 16 positions on SmolLM2 (attention far from any trained
#: model's) 4.1e-5 against ONNX Runtime and 1.7e-5 between torch's own cached and uncached runs. 2e-4 leaves
#: a margin of five over the worst; a misplaced cache entry or position moves logits by 1e-2 of the largest.
RELATIVE_TOLERANCE = 2e-4
VERIFY_NEW_TOKENS = 8


@dataclass
class GenaiResult:
    path: Path
    target: str
    layers: int
    size_bytes: int
    max_rel_diff: float            # ORT vs torch logits over every verified step, / the largest logit
    checked: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return (f"wrote {self.path} ({self.target}, {self.layers} cached attentions, {self.size_bytes / 2**20:.1f} "
                f"MiB): ONNX Runtime with its cache vs torch logits, max diff {self.max_rel_diff:.2g} of the "
                f"largest logit; {'; '.join(self.checked)}. Run it: onnxruntime_genai.Model('{self.path}')")


def capture_decoder(decoder: CacheDecoder) -> torch.export.ExportedProgram:
    """torch.export of one decoder step with named dynamic axes (batch, sequence, past_sequence,
    total_sequence); total = past + sequence is asserted at run time, not specialised. torch.export takes a
    dynamic size to be at least 2, so its ranges start there (and total at 4); the ONNX graph has no such
    check, and the verification runs it with one new token and with no past."""
    layout, longest = decoder.layout, decoder.layout.max_length
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("sequence", max=longest - 2)
    past = Dim("past_sequence", max=longest - 2)
    total = Dim("total_sequence", min=4, max=longest)
    ids = torch.ones(2, 3, dtype=torch.long)
    mask = torch.ones(2, 7, dtype=torch.long)
    pasts = [torch.zeros(2, h, 4, d) for h, d in layout.heads for _ in (0, 1)]
    extras = [e.example(2) for e in layout.extras]
    axes = {"batch": batch}
    extra_shapes = tuple({i: axes.setdefault(a, Dim(a.replace(".", "_"), max=longest)) for i, a in enumerate(e.axes)
                          if isinstance(a, str)} for e in layout.extras)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total},
              tuple({0: batch, 2: past} for _ in pasts) + extra_shapes)       # *past, *extras
    with torch.no_grad():
        return torch.export.export(decoder, (ids, mask, *pasts, *extras), dynamic_shapes=shapes, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)


def _name_axes(model, ep: torch.export.ExportedProgram, layout: CacheLayout) -> None:
    """The ONNX inputs' and outputs' symbolic axes by their names, not torch's symbols (s43)."""
    import onnx_ir as ir
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name not in ep.graph_signature.inputs_to_parameters
                    and n.name not in ep.graph_signature.inputs_to_buffers
                    and n.name not in ep.graph_signature.inputs_to_lifted_tensor_constants]
    ids, mask, past = (p.meta["val"] for p in placeholders[:3])
    names = {str(ids.shape[0]): "batch", str(ids.shape[1]): "sequence", str(mask.shape[1]): "total_sequence",
             str(past.shape[2]): "past_sequence"}
    for extra, node in zip(layout.extras, placeholders[len(placeholders) - len(layout.extras):]):
        names.update((str(node.meta["val"].shape[i]), a) for i, a in enumerate(extra.axes) if isinstance(a, str))
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        dims = [ir.SymbolicDim(names.get(str(d), str(d))) if isinstance(d, ir.SymbolicDim) else d
                for d in value.shape]
        if value.name.startswith("present."):
            dims[2] = ir.SymbolicDim("total_sequence")
        if value.name == "logits":
            dims[:2] = [ir.SymbolicDim("batch"), ir.SymbolicDim("sequence")]
        value.shape = ir.Shape(dims)


def genai_config(config, layout: CacheLayout, vocab: int) -> dict:
    """ONNX Runtime GenAI's ``genai_config.json`` for the decoder (as its model builder writes it)."""
    heads = {h for h, _ in layout.heads}
    dims = {d for _, d in layout.heads}
    if len(heads) != 1 or len(dims) != 1:
        raise ExportError("ONNX Runtime GenAI takes one key/value shape for every layer; this model's attentions "
                          f"have {sorted(layout.heads)}")
    eos = config.eos_token_id
    if eos is None or eos == []:
        raise ExportError("ONNX Runtime GenAI needs an end-of-sequence token, and the model's config names no "
                          "eos_token_id")
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    hidden = getattr(config, "hidden_size", None) or layout.heads[0][0] * layout.heads[0][1]
    return {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else pad,
            "context_length": layout.max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": dims.pop(),
                "hidden_size": hidden,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": getattr(config, "num_attention_heads", heads.copy().pop()),
                "num_hidden_layers": layout.layers,
                "num_key_value_heads": heads.pop(),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            # the decoder-only pipeline; the graph computes its own positions, so no model-specific handling
            "type": "llama",
            "vocab_size": vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": layout.max_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


class OnnxStep:
    """One decoder step in ONNX Runtime: ``(ids, mask, past) -> (logits, present)``, numpy in and out; the
    session is :func:`peftc.export.onnx.load_session`'s."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self._bind(load_session(path, threads))

    def _bind(self, session) -> None:
        """Run ``session``: its inputs in order (initializers with defaults are not listed) and the cache's heads."""
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.heads = [(i.shape[1], i.shape[3]) for i in session.get_inputs()
                      if i.name.startswith("past_key_values.") and i.name.endswith(".key")]

    def empty(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h, 0, d), np.float32) for h, d in self.heads for _ in (0, 1)]

    def __call__(self, ids, mask, past, extras=()):
        """``extras``: the values of the inputs that follow the cache (:class:`peftc.export.kvcache.ExtraInput`)."""
        out = self.session.run(None, dict(zip(self.inputs, [ids, mask, *past, *extras])))
        return out[0], out[1:]


class TorchStep:
    """:class:`OnnxStep` for the torch :class:`CacheDecoder`."""

    def __init__(self, decoder: CacheDecoder):
        self.decoder = decoder

    def empty(self, batch: int) -> list[np.ndarray]:
        return [t.numpy() for t in self.decoder.layout.empty(batch)]

    def __call__(self, ids, mask, past, extras=()):
        with torch.no_grad():
            out = self.decoder(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (ids, mask, *past, *extras)))
        return out[0].float().numpy(), [t.numpy() for t in out[1:]]


def decode(step, ids: np.ndarray, mask: np.ndarray, new_tokens: int, forced: np.ndarray | None = None,
           eos_id: int | None = None, *, past: list[np.ndarray] | None = None,
           extras: tuple = ()) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy decoding with a cache: (tokens (batch, n), the last-position logits of each step). ``forced``
    (batch, n) feeds those tokens instead of the argmax (to compare two decoders on the same sequence). Rows
    that produced ``eos_id`` keep producing it; decoding stops when every row has. ``past`` starts the cache
    (``mask`` then covers it first; empty by default); ``extras`` go to every step after the cache."""
    past = step.empty(ids.shape[0]) if past is None else past
    more = (tuple(extras),) if extras else ()
    tokens, logits = [], []
    done = np.zeros(ids.shape[0], bool)
    for t in range(new_tokens):
        out, past = step(ids, mask, past, *more)
        last = out[:, -1].astype(np.float32)
        logits.append(last)
        token = forced[:, t] if forced is not None else last.argmax(-1)
        if eos_id is not None:
            token = np.where(done, eos_id, token)
            done |= token == eos_id
        tokens.append(token)
        if eos_id is not None and done.all():
            break
        ids = token[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    return np.stack(tokens, 1), logits


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch of prompts padded on the left, and its attention mask."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def _verify_prompts(config) -> list[list[int]]:
    vocab = min(getattr(config, "vocab_size", 32) or 32, 1000)
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 3, 11)]


def _margin_agrees(reference: np.ndarray, got: np.ndarray, logits: list[np.ndarray], tol: float,
                   eos: set[int]) -> bool:
    """Each row's tokens equal up to where they part, and they part only at a step whose top two logits are
    within ``tol`` (a tie either decoder may break; what follows is not comparable). A reference row ends at
    its first end-of-sequence token (``generate()`` pads after it)."""
    for row in range(reference.shape[0]):
        ref = reference[row].tolist()
        end = next((t + 1 for t, token in enumerate(ref) if token in eos), len(ref))
        length = min(end, got.shape[1])
        differ = np.nonzero(reference[row, :length] != got[row, :length])[0]
        if differ.size:
            top = np.sort(logits[differ[0]][row])[-2:]
            if top[1] - top[0] > tol:
                return False
    return True


def verify_decoder(step, model, decoder: CacheDecoder, *, hf_model=None,
                   tolerance: float = RELATIVE_TOLERANCE) -> tuple[float, list[str]]:
    """Check an ONNX decoder step (see the module doc) within ``tolerance`` of the largest logit; returns
    (max diff / largest logit, what was checked)."""
    config = decoder.config
    prompts = _verify_prompts(config)
    pad = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    ids, mask = left_padded(prompts, pad)
    tokens, got = decode(step, ids, mask, VERIFY_NEW_TOKENS)
    _, expected = decode(TorchStep(decoder), ids, mask, VERIFY_NEW_TOKENS, forced=tokens)
    scale = max(float(np.abs(e).max()) for e in expected)
    worst = max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) / scale
    checked = [f"a left-padded batch of {len(prompts)} prompts, {VERIFY_NEW_TOKENS} greedy steps"]
    # each prompt alone (under a sliding window a left pad takes a place in the window, as in transformers'
    # cache), decoded with the cache, against the model without one on the same tokens
    for prompt in prompts:
        alone, steps = decode(step, np.array([prompt], np.int64), np.ones((1, len(prompt)), np.int64),
                              VERIFY_NEW_TOKENS)
        seq = torch.tensor([prompt + alone[0, :-1].tolist()])
        with torch.no_grad():
            whole = model(seq, torch.ones_like(seq)).float().numpy()[0, len(prompt) - 1:]
        worst = max(worst, float(np.abs(whole - np.concatenate(steps)).max()) / scale)
    checked.append("each prompt alone decodes as the uncached model computes")
    if worst > tolerance:
        raise ExportError(f"ONNX Runtime's cached decoding differs from torch by {worst:.3g} of the largest "
                          f"logit (tolerance {tolerance:g})")
    if hf_model is not None:
        with torch.no_grad():
            out = hf_model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                    do_sample=False, max_new_tokens=VERIFY_NEW_TOKENS, pad_token_id=pad, num_beams=1)
        reference = out[:, ids.shape[1]:].numpy()
        eos = hf_model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if not _margin_agrees(reference, tokens, got, tolerance * scale, eos):
            raise ExportError(f"ONNX Runtime's greedy tokens {tokens.tolist()} differ from transformers' "
                              f"generate() {reference.tolist()} on the merged weights")
        checked.append("greedy tokens equal transformers' generate() on the merged weights")
    return worst, checked


def export_genai(merged, path: str | Path, target: str = "fp32", *, block: int | None = None) -> GenaiResult:
    """Write ``merged``'s KV-cache decoder for ONNX Runtime GenAI to the directory ``path`` (see the module
    doc); ``path`` is replaced only by a directory whose decoder passed :func:`verify_decoder`."""
    import onnx
    path = Path(path)
    seconds = {}
    start = time.perf_counter()
    model = target_model(merged, target, block=block)
    decoder = cache_decoder(model)
    try:
        ep = capture_decoder(decoder)
        with quiet():
            program, _route = _convert(ep, ep.example_inputs[0], decoder.layout.input_names(),
                                       decoder.layout.output_names())
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{path}: the KV-cache decoder did not convert to ONNX: {exc}") from exc
    _name_axes(program.model, ep, decoder.layout)
    seconds["convert"] = time.perf_counter() - start
    config = merged.config
    vocab = int(ep.graph_module.graph.find_nodes(op="output")[0].args[0][0].meta["val"].shape[-1])
    tokenizer = _tokenizer_files(merged.model_ref)
    hf_model = _oracle(merged, target)
    with atomic_dir(path) as tmp:
        start = time.perf_counter()
        size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                   if v.const_value is not None)
        program.save(str(tmp / MODEL_FILE), external_data=size > 1 << 30)
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        seconds["save"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            verified = OnnxStep(tmp / MODEL_FILE)
            worst, checked = verify_decoder(verified, model, decoder, hf_model=hf_model)
        except ExportError as exc:
            raise ExportError(f"{path}: {exc}; nothing was written") from exc
        if target == "int4" and "CUDAExecutionProvider" not in providers():
            moved = int8_activations(verified, tmp / MODEL_FILE, decoder.config)
            checked.append(f"then int8 activations (MatMulNBits accuracy_level 4, as the builder's CPU int4) move "
                           f"the logits by {moved:.2g} of the largest")
        seconds["verify"] = time.perf_counter() - start
        write_json(tmp / "genai_config.json", genai_config(config, decoder.layout, vocab))
        write_json(tmp / ORIGIN_FILE, {"model": merged.model_ref, "target": target, "max_rel_diff": worst,
                                       "checked": checked})
        for file in tokenizer:
            shutil.copyfile(file, tmp / file.name)
        total = sum(p.stat().st_size for p in tmp.iterdir())
    return GenaiResult(path, target, decoder.layout.layers, total, worst, checked, seconds)


def int8_activations(verified: OnnxStep, path: Path, config) -> float:
    """Set every MatMulNBits of the decoder ``path`` (``verified`` is its session, run before) to
    ``accuracy_level=4``, as ONNX Runtime GenAI's builder does for the CPU: the kernel rounds each row of its
    input to int8 per block and runs int8 dot products (on SmolLM2-135M a decoder step took 1.4 times less
    time, measured on a busy 2-core EPYC). This is the only change to the verified graph; int8 rounding has
    no torch model to verify it bit for bit against, as a rounding step flips on last-bit differences.
    Returns how far it moves the logits of the verification batch, fed the same greedy tokens, / the largest
    logit."""
    import onnx
    prompts = _verify_prompts(config)
    ids, mask = left_padded(prompts, config.pad_token_id if isinstance(config.pad_token_id, int) else 0)
    tokens, before = decode(verified, ids, mask, VERIFY_NEW_TOKENS)
    model = onnx.load(str(path), load_external_data=False)
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", 4)])
    onnx.save(model, str(path))
    _, after = decode(OnnxStep(path), ids, mask, VERIFY_NEW_TOKENS, forced=tokens)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(after, before)) / max(float(np.abs(b).max()) for b in before)
    if not np.isfinite(moved):
        raise ExportError("the decoder's logits are not finite with int8 activations")
    return moved


def _tokenizer_files(ref) -> list[Path]:
    """The tokenizer's files in the model's directory (none for the tiny built-ins or a model object)."""
    try:
        _kind, source = resolve(ref)
    except (PeftcError, TypeError):
        return []
    return [p for p in sorted(source.iterdir()) if p.name in TOKENIZER_FILES] if source else []


def exported_model(path: str | Path) -> str | None:
    """The model reference a ``--genai`` directory (or a file in it) was exported from, if it says."""
    path = Path(path)
    origin = (path if path.is_dir() else path.parent) / ORIGIN_FILE
    if not origin.is_file():
        return None
    try:
        return json.loads(origin.read_text()).get("model")
    except (ValueError, AttributeError):
        return None


def _oracle(merged, target: str):
    """transformers' model holding the merged weights, where it computes what the file does: every adapter
    folded, a float32 base, the fp32 target."""
    if target != "fp32" or merged.records or merged.base_dtype != torch.float32:
        return None
    try:
        return hf_from_merged(merged)
    except PeftcError:      # tied weights an adapter changed, say: the uncached model stays the reference
        return None
