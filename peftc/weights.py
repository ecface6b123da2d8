"""Where a model's weights come from when it is streamed: a Hugging Face checkpoint read tensor by tensor.

A model directory is built without weights (:func:`empty_model`: every parameter on the meta device, the
buffers a model computes itself, such as rotary frequencies, real), captured and compiled; the compiled
graph's tensors are then read from the safetensors shards (memory-mapped) one at a time, each straight into
its final form: a linear a ``quant`` statement selects is quantized as it is read and its float copy is
dropped at once, every other tensor is kept in the checkpoint's dtype (or the ``--dtype`` asked for).
So peak memory is the compiled model plus one tensor, not the float model plus its quantized copy."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import platform
from operator import attrgetter
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from peftc.errors import ModelError
from peftc.graph.capture import PREFIX

INDEX = "model.safetensors.index.json"
#: the dtype names of the safetensors format
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class Checkpoint:
    """The tensors of a model directory's safetensors files, by name, read on demand."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(self.directory.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files.update({name: path for name in f.keys()})
        self._open: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}

    @staticmethod
    def key(target: str) -> str:
        """The checkpoint name of a captured graph's tensor (``hf.model.embed_tokens.weight`` →
        ``model.embed_tokens.weight``)."""
        return target[len(PREFIX):] if target.startswith(PREFIX) else target

    def has(self, target: str) -> bool:
        return self.key(target) in self.files

    def read(self, target: str, like: torch.Tensor, *, mapped: bool = True) -> torch.Tensor:
        """The tensor ``target`` names, checked against ``like`` (its meta stand-in) and in its dtype.
        ``mapped``: backed by the memory-mapped file (a tensor the model keeps: its pages are read when
        used); else read into memory of its own, which is returned when the tensor goes (a weight that is
        quantized and dropped leaves no mapped pages behind)."""
        key = self.key(target)
        if key not in self.files:
            raise ModelError(f"{self.directory}'s safetensors have no tensor '{key}'")
        path = self.files[key]
        if mapped:
            if path not in self._open:
                self._open[path] = safe_open(str(path), framework="pt")
            tensor = self._open[path].get_tensor(key)
        else:
            tensor = self._read_unmapped(path, key)
        if tensor.shape != like.shape:
            raise ModelError(f"{self.directory}: '{key}' has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(like.shape)}")
        return tensor.to(like.dtype) if tensor.is_floating_point() else tensor

    def _read_unmapped(self, path: Path, key: str) -> torch.Tensor:
        """One tensor of a safetensors file by a plain read: the 8-byte header length, the JSON header
        (dtype, shape, byte offsets after the header), then the bytes."""
        if path not in self._headers:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[path] = (8 + size, json.loads(f.read(size)))
        start, header = self._headers[path]
        entry = header[key]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            f.readinto(buffer)
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"]) if buffer else \
            torch.empty(entry["shape"], dtype=dtype)

    def close(self) -> None:
        self._open.clear()


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with every parameter on the meta device and no initialisation run: a model of any size
    is built in the memory of its buffers (which stay real: a model computes some, rotary frequencies say,
    in ``__init__`` and no checkpoint holds them)."""
    from transformers.initialization import no_init_weights
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:     # a tied weight registered again stays the one object
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    nn.Module.register_parameter = on_meta
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = register


def meta_tensors(gm: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and buffer of ``gm`` still on the meta device."""
    return [(n, t) for n, t in (*gm.named_parameters(remove_duplicate=False),
                                *gm.named_buffers(remove_duplicate=False)) if t.is_meta]


def meta_constants(gm: nn.Module, model: nn.Module) -> list[str]:
    """Meta tensors of a captured graph that are not the model's parameters: constants the model computed
    in its forward from a weight's device (Falcon's key/value indices), whose values a capture on the meta
    device cannot know. Such a model is captured again with values."""
    own = {PREFIX + name for name, _ in model.named_parameters(remove_duplicate=False)}
    found = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in own:
            value = attrgetter(node.target)(gm)
            if isinstance(value, torch.Tensor) and value.is_meta:
                found.append(node.target)
    return found


#: glibc's mallopt parameter, and the threshold its allocator grows to by itself (64-bit)
_M_MMAP_THRESHOLD, _GROWN_THRESHOLD = -3, 32 << 20


@functools.cache
def _glibc():
    return ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


@contextlib.contextmanager
def transient_buffers_unmapped():
    """While weights are read (and quantized) one at a time, make every buffer of 1 MiB or more a mapping of
    its own, returned to the system when it is freed. glibc's allocator raises its mmap threshold after the
    first such buffer is freed (up to 32 MiB), and from then on the float copies and the quantizer's
    temporaries come from the heap, which does not shrink: on a 0.5B QLoRA compile that was 0.3 to 0.7 GiB
    more peak memory, different in every run. Afterwards the threshold stays at the 32 MiB the allocator
    would have grown to. No effect off glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GROWN_THRESHOLD)


def materialize(gm: nn.Module, checkpoint: Checkpoint, names: list[str] | None = None) -> None:
    """Read the meta parameters and buffers of ``gm`` (``names``, default all) from ``checkpoint`` and put
    them in place. Names that share one tensor (a head tied to the embedding) are read once and share it."""
    entries = meta_tensors(gm)
    chosen = {id(t) for n, t in entries if names is None or n in names}
    new: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in entries:
            if id(tensor) not in chosen:
                continue
            if id(tensor) not in new:
                value = checkpoint.read(name, tensor)
                new[id(tensor)] = nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value
            owner, _, attr = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            if attr in module._parameters:
                module._parameters[attr] = new[id(tensor)]
            else:
                module._buffers[attr] = new[id(tensor)]
