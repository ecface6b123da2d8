"""A quantized weight format, described once (:class:`Scheme`), and a weight quantized in one
(:class:`Quantized`). Each format module (:mod:`~peftc.quant.nf4`, :mod:`~peftc.quant.int8`,
:mod:`~peftc.quant.int4`) defines one ``SCHEME``: :mod:`peftc.quant.ops` makes its custom ops from it,
:mod:`peftc.quant.rewrite` stores its tensors as buffers by its names and dequantizes through it, and
:mod:`peftc.export.lowerings` lowers its ops to ONNX."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

#: the weight dtypes the formats quantize (those bitsandbytes quantizes)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Scheme:
    """One quantized weight format. ``tensors``: the names of the stored tensors in op-argument order, a
    trailing '?' on one that may be None; ``params``: the non-tensor op arguments, as schema text
    ("int[] shape"); ``options``: the keyword options ``quantize`` takes. ``quantize(weight, **options)``
    gives (the stored tensors by name, the params) and ``dequantize(tensors, params)``, with the tensors in
    ``tensors`` order, the float32 weight back."""
    name: str
    tensors: tuple[str, ...]
    params: tuple[str, ...]
    options: tuple[str, ...]
    quantize: Callable[..., tuple[dict[str, torch.Tensor | None], tuple]]
    dequantize: Callable[[Sequence[torch.Tensor | None], Sequence], torch.Tensor]

    @property
    def names(self) -> tuple[str, ...]:
        """The stored tensors' names, without the '?'."""
        return tuple(t.rstrip("?") for t in self.tensors)

    @property
    def n_tensors(self) -> int:
        return len(self.tensors)


def stored_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """The bytes stored tensors take (an absent optional one, None, takes none)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Quantized:
    """A weight quantized in ``scheme``: the stored tensors by the scheme's names (also readable as
    attributes, ``q.packed``), the params, and the dtype and number of values of the weight it came from."""
    scheme: Scheme
    stored: dict[str, torch.Tensor | None]
    params: tuple
    dtype: torch.dtype
    numel: int

    @classmethod
    def of(cls, scheme: Scheme, weight: torch.Tensor, **options) -> Quantized:
        """``weight`` quantized by ``scheme.quantize(weight, **options)``."""
        stored, params = scheme.quantize(weight, **options)
        return cls(scheme, stored, params, weight.dtype, weight.numel())

    def __getattr__(self, name: str):
        stored = self.__dict__.get("stored", {})
        if name in stored:
            return stored[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is stored, by name: the bytes a deployment keeps."""
        return {name: t for name, t in self.stored.items() if t is not None}

    def dequantize(self) -> torch.Tensor:
        """The weight back, in the dtype it was quantized from."""
        tensors = tuple(self.stored[name] for name in self.scheme.names)
        return self.scheme.dequantize(tensors, self.params).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """The bytes a deployment keeps: every stored tensor."""
        return stored_bytes(self.stored.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.numel, 1)
