"""Greedy generation and exact-match evaluation, from a compiled model, its merged form, or an ONNX file.

Three decoders give the same tokens (the tests check it on a tiny model):

* :class:`RecomputeDecoder` runs any ``logits(input_ids, attention_mask)`` function (a CompiledModel,
  merged or not, or an ONNX Runtime session) on the whole sequence at each step: the captured graphs and
  their ONNX exports have no KV cache.
* :class:`CachedDecoder` copies a merged CompiledModel's weights into a fresh ``transformers`` model and
  decodes with its KV cache: about ten times fewer FLOPs, the fast path for merged LoRA/IA3 adapters.
* :func:`decoder_for` picks the cached one when every adapter folds, else recomputation (and the same for
  an encoder-decoder, :mod:`peftc.training.seq2seq`).
* :class:`OnnxCachedDecoder` runs a KV-cache decoder written by ``peftc export --genai`` in ONNX Runtime,
  one new token a step; :class:`GenaiDecoder` runs the same directory in onnxruntime-genai.

Prompts are batched only with prompts of the same token length, so no batch needs padding and every
decoder sees exactly the tokens a batch of one would."""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from peftc.export.genai import OnnxStep, decode, left_padded
from peftc.export.hf import hf_from_merged
from peftc.export.onnx import providers
from peftc.training.data import Codec, Record
from peftc.training.seq2seq import Seq2SeqCachedDecoder, Seq2SeqRecomputeDecoder, start_token
from peftc.errors import PeftcError


class RecomputeDecoder:
    """Greedy decoding by re-running the whole sequence every step."""

    def __init__(self, logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str = "torch"):
        self.logits_fn = logits_fn
        self.name = name

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id: int) -> torch.Tensor:
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        new = []
        for _ in range(max_new_tokens):
            logits = self.logits_fn(ids, torch.ones_like(ids))
            token = torch.as_tensor(logits[:, -1]).argmax(-1)
            token = torch.where(done, torch.full_like(token, eos_id), token)
            new.append(token)
            done |= token == eos_id
            if bool(done.all()):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
        return torch.stack(new, dim=1) if new else ids.new_zeros((ids.shape[0], 0))


class CachedDecoder:
    """Greedy decoding with a ``transformers`` model and its KV cache."""
    name = "torch (KV cache)"

    def __init__(self, hf_model: torch.nn.Module):
        self.model = hf_model.eval()

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id: int) -> torch.Tensor:
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                                      pad_token_id=eos_id, num_beams=1)
        return out[:, ids.shape[1]:]


class OnnxCachedDecoder:
    """Greedy decoding of a ``peftc export --genai`` directory (or its model.onnx) in ONNX Runtime, with the
    file's KV cache."""
    name = "onnxruntime (KV cache)"

    def __init__(self, path: str | Path):
        self.step = OnnxStep(path)

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id: int) -> torch.Tensor:
        batch, mask = left_padded(ids.tolist(), eos_id)
        tokens, _ = decode(self.step, batch, mask, max_new_tokens, eos_id=eos_id)
        return torch.from_numpy(tokens.astype("int64"))


class GenaiDecoder:
    """Greedy decoding of a ``peftc export --genai`` directory in onnxruntime-genai (``og.Generator``)."""
    name = "onnxruntime-genai (KV cache)"

    def __init__(self, path: str | Path):
        import onnxruntime_genai as og
        self.og = og
        self.model = og.Model(str(path))

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_id: int) -> torch.Tensor:
        rows = []
        for prompt in ids.tolist():
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
            generator = self.og.Generator(self.model, params)
            generator.append_tokens(prompt)
            new = []
            while not generator.is_done() and len(new) < max_new_tokens:
                generator.generate_next_token()
                new.append(int(generator.get_next_tokens()[0]))
            rows.append(new + [eos_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows, dtype=torch.long)


def onnx_decoder(path: str | Path, runtime: str = "auto"):
    """The decoder for an ONNX path: a ``--genai`` directory (onnxruntime-genai when installed and
    ``runtime`` allows, else ONNX Runtime with the cache), a KV-cache model file, or a whole-sequence file
    (re-run every step: it has no cache)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "genai_config.json").is_file():
            raise PeftcError(f"'{path}' is a directory without genai_config.json: not a 'peftc export --genai' output")
        if runtime in ("auto", "genai"):
            try:
                return GenaiDecoder(path)
            except ImportError:
                if runtime == "genai":
                    raise PeftcError("--runtime genai needs onnxruntime-genai: pip install 'peftc[genai]'") from None
        return OnnxCachedDecoder(path / "model.onnx")
    if runtime == "genai":
        raise PeftcError(f"--runtime genai runs a 'peftc export --genai' directory, not the file '{path}'")
    if not path.is_file():
        raise PeftcError(f"ONNX file '{path}' does not exist")
    import onnx
    inputs = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    other = [name for name in inputs if name in ("decoder_input_ids", "pixel_values", "input_features")]
    if other:
        raise PeftcError(f"'{path}' takes {other[0]}: --onnx decodes causal language models only; evaluate an "
                         "encoder-decoder or a classifier from its trained directory (in torch)")
    if any(name.startswith("past_key_values.") for name in inputs):
        return OnnxCachedDecoder(path)
    return RecomputeDecoder(onnx_logits(path), "onnxruntime (no KV cache: re-runs the sequence)")


def torch_logits(model: torch.nn.Module) -> Callable:
    def run(ids, mask):
        with torch.no_grad():
            return model(ids, mask)
    return run


def onnx_logits(path: str | Path) -> Callable:
    """A logits function backed by an ONNX Runtime session on an exported model."""
    import onnxruntime as ort
    path = Path(path)
    if not path.is_file():
        raise PeftcError(f"ONNX file '{path}' does not exist")
    session = ort.InferenceSession(str(path), providers=providers())
    names = [i.name for i in session.get_inputs()]

    def run(ids, mask):
        feeds = dict(zip(names, (ids.numpy().astype("int64"), mask.numpy().astype("int64"))))
        return torch.from_numpy(session.run(None, feeds)[0])
    return run


def cached_decoder(hf_model):
    """A transformers model's own KV-cache decoder, for a causal LM or an encoder-decoder."""
    return Seq2SeqCachedDecoder(hf_model) if hf_model.config.is_encoder_decoder else CachedDecoder(hf_model)


def decoder_for(model, recompute: bool = False):
    """The fastest exact decoder for a CompiledModel, a causal LM or an encoder-decoder: the merged weights
    in transformers with its KV cache when every adapter folds (and ``recompute`` is not asked for), else
    re-running the compiled graph."""
    seq2seq = model.kind == "seq2seq-lm"
    if not recompute:
        merged = model if not model.records else model.merge()
        if model.kind in ("causal-lm", "seq2seq-lm") and not merged.records:
            try:
                return cached_decoder(hf_from_merged(merged))
            except PeftcError:
                pass
    model.eval()
    if seq2seq:
        return Seq2SeqRecomputeDecoder(lambda ids, mask, dec: model(ids, mask, dec), start_token(model.config))
    return RecomputeDecoder(torch_logits(model))


def greedy(decoder, prompts: list[list[int]], *, eos_id: int, max_new_tokens: int,
           batch_size: int = 16) -> list[list[int]]:
    """Generated ids of each prompt (up to, not including, the first eos)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if not p:
            raise PeftcError("cannot generate from an empty prompt")
        by_length[len(p)].append(i)
    results: list[list[int] | None] = [None] * len(prompts)
    for length in sorted(by_length):
        members = by_length[length]
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long)
            new = decoder.generate(ids, max_new_tokens, eos_id)
            for i, row in zip(chunk, new.tolist()):
                results[i] = row[:row.index(eos_id)] if eos_id in row else row
    return results  # type: ignore[return-value]


def answer(text: str) -> str:
    """What exact-match compares: the first line of the generated text, without surrounding spaces."""
    return text.strip().split("\n", 1)[0].strip()


@dataclass
class EvalResult:
    correct: int
    total: int
    seconds: float
    decoder: str
    rows: list[tuple[Record, str, bool]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        return (f"exact match: {self.correct}/{self.total} = {100 * self.accuracy:.1f}% "
                f"({self.decoder}, {self.seconds:.1f} s)")


def exact_match(decoder, codec: Codec, records: list[Record], *, max_new_tokens: int | None = None,
                batch_size: int = 16, chat: bool = False) -> EvalResult:
    """Greedy-decode each record's prompt and compare :func:`answer` of the output with the completion's."""
    records = [r for r in records if not r.is_text]
    if not records:
        raise PeftcError("exact-match evaluation needs prompt/completion records")
    if max_new_tokens is None:   # room for the longest reference, its eos, and a little
        max_new_tokens = max(len(codec.encode_completion(r.completion)) for r in records) + 2
    start = time.perf_counter()
    outputs = greedy(decoder, [codec.encode_prompt(r.prompt, chat) for r in records], eos_id=codec.eos_id,
                     max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = []
    for record, ids in zip(records, outputs):
        text = codec.decode(ids)
        rows.append((record, text, answer(text) == answer(record.completion)))
    return EvalResult(sum(ok for _, _, ok in rows), len(rows), time.perf_counter() - start,
                      getattr(decoder, "name", type(decoder).__name__), rows)
