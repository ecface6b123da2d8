"""A merged Hugging Face checkpoint: what vLLM, TGI, Optimum, ONNX Runtime GenAI's model builder and
llama.cpp's converter take. The merged model's weights go back under the base architecture's own names,
in the base dtype, into a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads:
``config.json``, ``generation_config.json``, ``model.safetensors`` (sharded with an index past
``max_shard_size``) and the tokenizer's files.

Only a merge that folded every adapter is the base architecture: a prefix, a soft prompt or a bottleneck
adapter stays a graph op after merging, and the checkpoint refuses it (export those to ONNX, or serve the
adapter through HF PEFT's files, which is also the route to vLLM's and TGI's multi-LoRA serving)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from peftc.errors import ExportError
from peftc.fsutil import atomic_dir
from peftc.graph.capture import PREFIX, strip_prefix
from peftc.models import build_model, dtype_name, load_model, resolve

DEFAULT_SHARD_SIZE = "2GB"
#: the tokenizer's files, copied from the model's directory when it has them
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "chat_template.jinja", "chat_template.json"}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                       torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class HFExportResult:
    path: Path
    files: list[str]
    tensors: int
    size_bytes: int
    dtype: str

    def __str__(self) -> str:
        shards = [f for f in self.files if f.endswith(".safetensors")]
        return (f"wrote {self.path}: {self.tensors} tensors in {len(shards)} safetensors file"
                f"{'s' if len(shards) > 1 else ''} ({self.size_bytes / 2**20:.1f} MiB, {self.dtype}) and "
                f"{', '.join(f for f in self.files if f not in shards)}; load it with "
                f"transformers.AutoModelForCausalLM.from_pretrained('{self.path}')")


def base_state(merged, path: Path) -> dict[str, torch.Tensor]:
    """The merged model's weights by the base model's names. A quantized linear that the merge turned back
    into dequant(W) (+ its LoRA) is stored under the name of the weight it replaced."""
    if merged.records:
        kept = sorted({f"{r.method} ({r.key})" for r in merged.records})
        raise ExportError(f"{path}: a Hugging Face checkpoint holds the base architecture's weights only, and "
                          f"{', '.join(kept[:4])}{' and more' if len(kept) > 4 else ''} stay graph ops after "
                          "merging: export this model with --onnx, or give HF PEFT the adapter's own files")
    renamed = {name: (base, record) for record in merged.folded for name, base in record.folded_weights().items()}
    out = {}
    for name, tensor in merged.graph_module.state_dict(keep_vars=True).items():
        base, record = renamed.get(name, (name, None))
        if base is None or not base.startswith(PREFIX):
            what = f"{record.method} at {record.key}" if record is not None else name
            raise ExportError(f"{path}: {what} left {name}, which the base architecture has no place for "
                              "(a bias bitfit gave a linear without one, say); nothing was written: export this "
                              "model with --onnx")
        out[base[len(PREFIX):]] = tensor.detach()
    return out


def export_hf(merged, path: str | Path, *, max_shard_size: str | int = DEFAULT_SHARD_SIZE) -> HFExportResult:
    """Write ``merged`` (a :meth:`CompiledModel.merge` that folded everything) as a Hugging Face checkpoint
    directory at ``path``. The directory is built beside ``path`` and replaces it only once every tensor
    the architecture names has been written and read back with its shape and dtype."""
    path = Path(path)
    state = base_state(merged, path)
    dtype = dtype_name(merged.base_dtype)
    model = build_model(merged.model_ref, dtype, meta=True)     # the architecture, with no storage
    expected = model.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    values = {}
    for names in by_tensor.values():          # tied names (a head tied to the embedding) share one tensor
        found = [state[n] for n in names if n in state]
        if not found:
            raise ExportError(f"{path}: the merged model has no tensor for {names[0]} of "
                              f"{type(model).__name__}; nothing was written")
        for name in names:
            values[name] = found[0]
    architecture = {name: _layout(t) for name, t in expected.items()}
    for name, tensor in values.items():
        if _layout(tensor) != architecture[name]:
            raise ExportError(f"{path}: {name} is {_layout(tensor)} in the merged model, {architecture[name]} in "
                              f"the {dtype} {type(model).__name__}; nothing was written")
    model.load_state_dict(values, assign=True, strict=True)
    _kind, source = resolve(merged.model_ref)
    tokenizer = [p for p in sorted(source.iterdir()) if p.name in TOKENIZER_FILES] if source else []
    from transformers.utils import logging as hf_logging
    with atomic_dir(path) as tmp:
        hf_logging.disable_progress_bar()          # peftc's own step line says what is being written
        try:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        finally:
            hf_logging.enable_progress_bar()
        for file in tokenizer:              # as they are: the same tokenizer, byte for byte
            shutil.copyfile(file, tmp / file.name)
        count, size = _check(tmp, path, architecture, model)
        files = sorted(p.name for p in tmp.iterdir())
    return HFExportResult(path, files, count, size, dtype)


def _layout(tensor: torch.Tensor) -> tuple[tuple[int, ...], str | None]:
    """(shape, safetensors dtype name): what a written tensor is checked by."""
    return tuple(tensor.shape), _SAFETENSORS_DTYPES.get(tensor.dtype)


def _check(directory: Path, path: Path, architecture: dict[str, tuple], model) -> tuple[int, int]:
    """Every tensor ``save_pretrained`` kept in ``directory`` (it drops tied duplicates) is in the safetensors
    files with the architecture's shape and dtype, and every other one is tied to one that is; (tensors,
    bytes). Errors name ``path``, where the directory was to go."""
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    written = {}
    for name in files:
        with safe_open(str(directory / name), "pt") as handle:
            for key in handle.keys():
                sliced = handle.get_slice(key)
                written[key] = (tuple(sliced.get_shape()), sliced.get_dtype())
    for key, found in written.items():
        if architecture.get(key) != found:
            raise ExportError(f"{path}: wrote {key} {found}, where the architecture has {architecture.get(key)}; "
                              "nothing was replaced")
    tensors = model.state_dict(keep_vars=True)
    untied = [n for n in architecture if n not in written
              and not any(tensors[n].data_ptr() == tensors[w].data_ptr() for w in written)]
    if untied:
        raise ExportError(f"{path}: {', '.join(sorted(untied)[:3])} missing from the written checkpoint; "
                          "nothing was replaced")
    return len(written), sum(tensors[k].numel() * tensors[k].element_size() for k in written)


def hf_from_merged(merged) -> torch.nn.Module:
    """A fresh transformers model of ``merged.model_ref`` holding the merged CompiledModel's weights."""
    if merged.records:
        raise ExportError("the model still has unfolded adapters")
    hf = load_model(merged.model_ref)
    state = {strip_prefix(name): tensor for name, tensor in merged.graph_module.state_dict().items()}
    own = hf.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ExportError(f"merged weights do not map onto {merged.model_ref}: {unknown[:3]}")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor)
    # tied weights (embedding and head) share storage: an adapter on one of them cannot be copied this way
    if any(not torch.equal(own[key], tensor) for key, tensor in state.items()):
        raise ExportError(f"merged weights of tied tensors differ; {merged.model_ref} ties them")
    return hf.eval()
