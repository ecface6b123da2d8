"""The adapter bank in ONNX: one KV-cache decoder serving a mixed-task batch (:func:`export_bank`,
:class:`OnnxEngine`).

``OUT/model.onnx`` is the bank's decoder step with the stacked adapters as initializers: inputs
``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/value`` and ``task_ids`` (batch,) int64, one per
row; outputs ``logits`` and ``present.{i}.key/value``, as :mod:`peftc.export.genai` names them.
``OUT/pasts.safetensors`` holds the soft prompts' and prefixes' keys and values (a row's starting cache),
``OUT/peftc.json`` the model reference and each adapter's task id, beside the tokenizer's files.

The directory takes its name only once ONNX Runtime decodes correctly: a left-padded batch with one row per
adapter (and one for the base) gives, greedy step by step, the torch bank's logits, and so does each row
decoded alone (:func:`verify_bank`)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from peftc.errors import ExportError, PeftcError, read_json
from peftc.export.genai import (MODEL_FILE, ORIGIN_FILE, RELATIVE_TOLERANCE, OnnxStep, TorchStep, _name_axes,
                                _tokenizer_files, _verify_prompts, capture_decoder, decode, left_padded)
from peftc.export.onnx import _convert, quiet
from peftc.fsutil import atomic_dir, write_json
from peftc.serve.rows import RowCaches, join_starts

PASTS_FILE = "pasts.safetensors"
KIND = "adapter-bank"
VERIFY_NEW_TOKENS = 6


@dataclass
class BankExport:
    path: Path
    names: list[str]
    max_rel_diff: float

    def __str__(self) -> str:
        return (f"wrote {self.path}: one decoder for {', '.join(self.names)} (task ids 0..{len(self.names) - 1}); "
                f"ONNX Runtime vs torch logits, each row in a mixed batch and alone, max diff "
                f"{self.max_rel_diff:.2g} of the largest logit")


class OnnxEngine(RowCaches):
    """A bank directory written by :func:`export_bank`, run in ONNX Runtime (:class:`peftc.serve.engine.Engine`)."""

    def __init__(self, directory: str | Path, threads: int | None = None):
        directory = Path(directory)
        manifest_path = directory / ORIGIN_FILE
        if not manifest_path.is_file() or not (directory / MODEL_FILE).is_file():
            raise PeftcError(f"{directory} is not an adapter bank export (no {ORIGIN_FILE} or {MODEL_FILE}): "
                             "write one with AdapterBank.export_onnx or 'peftc bank ... --out'")
        manifest = read_json(manifest_path)
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND or not isinstance(manifest.get("adapters"), dict):
            raise PeftcError(f"{manifest_path}: not an adapter bank's manifest (no kind {KIND!r} with its adapters)")
        names = sorted(manifest["adapters"], key=manifest["adapters"].get)
        step = OnnxStep(directory / MODEL_FILE, threads)
        stored = load_file(str(directory / PASTS_FILE)) if (directory / PASTS_FILE).is_file() else {}
        pasts = {name: [stored[f"{name}.{i}"] for i in range(2 * len(step.heads))] for name in names
                 if f"{name}.0" in stored}
        super().__init__(names, pasts, step.heads, int(manifest["max_length"]))
        self.step = step
        self.model_ref = manifest.get("model")
        self.directory = directory

    def __call__(self, ids, mask, past, task_ids):
        return self.step(np.asarray(ids, np.int64), np.asarray(mask, np.int64), past,
                         (np.asarray(task_ids, np.int64),))


def export_bank(bank, directory: str | Path) -> BankExport:
    """Write ``bank`` (a :class:`peftc.serve.bank.AdapterBank`) to the directory (see the module doc); it is
    replaced only by a directory that passed :func:`verify_bank`."""
    import onnx
    path = Path(directory)
    if bank.dtype != torch.float32:
        raise ExportError(f"{path}: the bank's ONNX decoder is exported from a float32 base; this one is "
                          f"{bank.dtype} (load the bank with dtype='fp32')")
    decoder = bank.decoder
    try:
        ep = capture_decoder(decoder)
        with quiet():
            program, _route = _convert(ep, ep.example_inputs[0], decoder.layout.input_names(),
                                       decoder.layout.output_names())
    except Exception as exc:
        raise ExportError(f"{path}: the bank's decoder did not convert to ONNX: {exc}") from exc
    _name_axes(program.model, ep, decoder.layout)
    tokenizer = _tokenizer_files(bank.model_ref)
    with atomic_dir(path) as tmp:
        program.save(str(tmp / MODEL_FILE))
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        try:
            worst = verify_bank(OnnxStep(tmp / MODEL_FILE), TorchStep(decoder), bank.torch_engine(), decoder.config)
        except ExportError as exc:
            raise ExportError(f"{path}: {exc}; nothing was written") from exc
        stored = {f"{name}.{i}": np.ascontiguousarray(t) for name, past in bank.pasts.items()
                  for i, t in enumerate(past)}
        if stored:
            save_file(stored, str(tmp / PASTS_FILE))
        write_json(tmp / ORIGIN_FILE, {"kind": KIND, "model": bank.model_ref,
                                       "adapters": {name: i for i, name in enumerate(bank.names)},
                                       "directories": {n: str(d) for n, d in bank.directories.items()},
                                       "max_length": decoder.layout.max_length, "max_rel_diff": worst})
        for file in tokenizer:
            shutil.copyfile(file, tmp / file.name)
    return BankExport(path, list(bank.names), worst)


def verify_bank(step, reference, rows: RowCaches, config, tolerance: float = RELATIVE_TOLERANCE) -> float:
    """Greedy decoding with ``step`` of a left-padded batch, one row per name (starting from its cache, with
    its task id), and of each row alone, against ``reference`` fed the same tokens: the largest logit
    difference over the largest logit, or an ExportError past ``tolerance``."""
    prompts = _verify_prompts(config)
    pad = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    names = rows.names
    chosen = [prompts[i % len(prompts)] for i in range(len(names))]
    ids, mask = left_padded(chosen, pad)
    past, start = join_starts(rows, names)
    task_ids = rows.task_ids(names)
    tokens, got = decode(step, ids, np.concatenate([start, mask], 1), VERIFY_NEW_TOKENS, past=past,
                         extras=(task_ids,))
    _, expected = decode(reference, ids, np.concatenate([start, mask], 1), VERIFY_NEW_TOKENS, forced=tokens,
                         past=[p.copy() for p in past], extras=(task_ids,))
    scale = max(float(np.abs(e).max()) for e in expected)
    worst = max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) / scale
    for row, (name, prompt) in enumerate(zip(names, chosen)):
        alone, first = rows.start(name)
        _, steps = decode(step, np.array([prompt], np.int64), np.concatenate([first, np.ones((1, len(prompt)),
                          np.int64)], 1), VERIFY_NEW_TOKENS, forced=tokens[row:row + 1], past=alone,
                          extras=(task_ids[row:row + 1],))
        worst = max(worst, max(float(np.abs(s[0] - e[row]).max()) for s, e in zip(steps, expected)) / scale)
    if worst > tolerance:
        raise ExportError(f"ONNX Runtime's mixed-task decoding differs from torch by {worst:.3g} of the largest "
                          f"logit (tolerance {tolerance:g})")
    return worst
