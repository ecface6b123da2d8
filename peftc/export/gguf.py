"""A merged model as one GGUF file (llama.cpp's format), written with the ``gguf`` package in llama.cpp's
tensor naming and metadata for the LLaMA family (``general.architecture = llama``): token_embd, blk.N.attn_q,
..., output_norm, output, with the Q and K rows permuted as llama.cpp's converter does (its rotary
embedding pairs adjacent dimensions, Hugging Face's pairs the two halves). Tensors are ``f32``, ``f16`` or
``q8_0`` (the 2-D weights; norms and 1-D tensors stay f32, as llama.cpp keeps them).

The tokenizer goes in as ``tokenizer.*`` metadata copied from the GGUF file the model came from (the default
SmolLM2 model, or any ``.gguf`` reference); a model from a Hugging Face directory gets no tokenizer metadata,
and the result says so (llama.cpp needs it to run the file; transformers reads the weights without it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peftc.errors import ExportError
from peftc.export.hf import base_state
from peftc.fsutil import atomic_path
from peftc.models import source_gguf

#: (the gguf package is imported where a file is written: importing it before a compile keeps the capture's
#: GraphModule, and so a passed model's float weights, alive after the compile, held from outside Python's
#: reference graph; seen with gguf 0.18 and torch 2.13, cause not found)
GGUF_TYPES = ("f32", "f16", "q8_0")
#: model_type → GGUF architecture this writer names tensors and metadata for
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}


@dataclass
class GGUFExportResult:
    path: Path
    tensors: int
    size_bytes: int
    gguf_type: str
    tokenizer: bool

    def __str__(self) -> str:
        tokenizer = ("the tokenizer of the GGUF file it came from" if self.tokenizer else
                     "no tokenizer (the model is not from a GGUF file: llama.cpp needs one to run it)")
        return (f"wrote {self.path} ({self.size_bytes / 2**20:.1f} MiB, {self.tensors} tensors, {self.gguf_type}) "
                f"with {tokenizer}")


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from (half, pair) order to (pair, half)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def export_gguf(merged, path: str | Path, gguf_type: str = "f16") -> GGUFExportResult:
    """Write ``merged`` (a merge that folded everything, of a LLaMA-family model) to the GGUF file ``path``;
    the file is written under a temporary name and renamed into place once it has been read back whole."""
    import gguf
    path = Path(path)
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"{path}: --gguf-type is one of {', '.join(GGUF_TYPES)}, not '{gguf_type}'")
    config = merged.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{path}: GGUF export names tensors for the LLaMA family ({', '.join(ARCHITECTURES)}); "
                          f"{type(config).__name__} ({model_type}) is not one: export it with --hf or --onnx")
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ExportError(f"{path}: rope scaling {scaling.get('rope_type', scaling.get('type'))!r} has no GGUF "
                          "metadata in this writer: export it with --hf and convert it with llama.cpp's script")
    state = base_state(merged, path)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {}
    for name, tensor in state.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{path}: {name} has no name in llama.cpp's LLaMA tensor map")
        if getattr(config, "tie_word_embeddings", False) and gguf_name == "output.weight":
            continue                          # llama.cpp reads a tied head from token_embd
        tensors[gguf_name] = tensor
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCHITECTURES[model_type])
        _add_metadata(writer, merged, gguf_type)
        tokenizer = _copy_tokenizer(writer, source_gguf(merged.model_ref))
        for name, tensor in tensors.items():
            _add_tensor(writer, name, tensor, gguf_type, heads, kv_heads)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        read = gguf.GGUFReader(str(tmp))
        if sorted(t.name for t in read.tensors) != sorted(tensors):
            raise ExportError(f"{path}: the written file does not hold the tensors it was given")
        size = tmp.stat().st_size
    return GGUFExportResult(path, len(tensors), size, gguf_type, tokenizer)


def _add_metadata(writer, merged, gguf_type: str) -> None:
    """llama.cpp's LLaMA hyperparameters, from the model's config."""
    import gguf
    config = merged.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(Path(str(merged.model_ref)).name or "peftc-merged")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])


def _add_tensor(writer, name: str, tensor, gguf_type: str, heads: int, kv_heads: int) -> None:
    """One tensor in llama.cpp's layout and type: Q and K rows permuted; 2-D weights in ``gguf_type``."""
    import gguf
    data = tensor.detach().float().numpy()
    if name.endswith("attn_q.weight"):
        data = _permute(data, heads)
    elif name.endswith("attn_k.weight"):
        data = _permute(data, kv_heads)
    q8 = gguf.GGMLQuantizationType.Q8_0
    if data.ndim < 2 or gguf_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif gguf_type == "f16" or data.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0]:
        writer.add_tensor(name, data.astype(np.float16))     # (rows q8_0 blocks cannot cut: f16)
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)


def _copy_tokenizer(writer, source: Path | None) -> bool:
    """Copy the ``tokenizer.*`` metadata of the GGUF file ``source`` (None: nothing to copy)."""
    import gguf
    if source is None:
        return False
    for name, field in gguf.GGUFReader(str(source)).fields.items():
        if name.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    return True

