"""peftc's own adapter file: every inserted parameter by its stable name, for any mix of methods.

``peftc_adapter.safetensors`` holds ``CompiledModel.adapter_parameters()`` and the normalized spec in its
metadata. It is what ``peftc compile`` and ``peftc train`` write and ``peftc export`` reads; HF PEFT's files
are written beside it when the adapters are of one method HF PEFT has a format for."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError

from peftc.errors import AdapterError
from peftc.fsutil import load_tensors, save_tensors

FILE = "peftc_adapter.safetensors"


def save_adapter(model, directory: str | Path) -> Path:
    path = Path(directory) / FILE
    tensors = {name: p.detach().contiguous() for name, p in model.adapter_parameters().items()}
    if not tensors:
        raise AdapterError("the model has no adapters to save")
    save_tensors(path, tensors, metadata={"format": "pt", "spec": model.spec.format()})
    return path


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt one is an AdapterError naming it."""
    try:
        return load_tensors(path)
    except SafetensorError as exc:
        raise AdapterError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None


def load_adapter(model, directory: str | Path) -> None:
    path = Path(directory) / FILE
    tensors = read_tensors(path)
    params = model.adapter_parameters()
    unknown, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
    if unknown or missing:
        raise AdapterError(f"{path} does not fit the compiled model: unexpected {unknown[:3]}, missing "
                           f"{missing[:3]}; was it written for another spec or model?")
    for name, param in params.items():
        value = tensors[name]
        if value.shape != param.shape:
            raise AdapterError(f"{path}: {name} has shape {tuple(value.shape)}, the model expects "
                               f"{tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
