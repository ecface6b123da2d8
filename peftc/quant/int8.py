"""int8 with one absmax per output row, as bitsandbytes' ``int8_vectorwise_quant`` (LLM.int8() without
outlier decomposition): ``q = round(w · 127 / absmax_row)``, dequantized as ``q · absmax_row / 127``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from peftc.errors import ModelError
from peftc.quant.nf4 import FLOAT_DTYPES
from peftc.quant.packed import PackedSize

#: bitsandbytes' ``int8_vectorwise_dequant`` multiplies by this float32 reciprocal of 127
INV_127 = 7.874015718698502e-3


@dataclass
class Int8Weight(PackedSize):
    qweight: torch.Tensor      # int8, (out, in)
    absmax: torch.Tensor       # float32, (out,)
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qweight.shape)

    @property
    def numel(self) -> int:
        return self.qweight.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "absmax": self.absmax}

    def dequantize(self) -> torch.Tensor:
        return (self.qweight * self.absmax.view(-1, 1) * INV_127).to(self.dtype)


def quantize(weight: torch.Tensor) -> Int8Weight:
    """Quantize a 2-D weight (out × in) to int8 per row."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        raise ModelError(f"int8 quantizes float32, float16 or bfloat16 tensors, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ModelError(f"int8 quantization is per row of a 2-D weight; got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ModelError(f"the weight of shape {tuple(weight.shape)} contains NaN or inf; refusing to quantize it")
    with torch.no_grad():
        w = weight.detach()
        absmax = w.abs().max(dim=1).values.float()
        safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)   # a zero row stays zero
        q = torch.round(w * (127.0 / safe.unsqueeze(-1))).to(torch.int8)
    return Int8Weight(qweight=q, absmax=absmax, dtype=weight.dtype)
