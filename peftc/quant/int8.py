"""int8 with one absmax per output row, as bitsandbytes' ``int8_vectorwise_quant`` (LLM.int8() without
outlier decomposition): ``q = round(w · 127 / absmax_row)``, dequantized as ``q · absmax_row / 127``.
Stored: ``qweight`` int8 (out, in) and ``absmax`` float32 (out,)."""
from __future__ import annotations

import torch

from peftc.errors import ModelError
from peftc.quant.scheme import FLOAT_DTYPES, Quantized, Scheme

#: bitsandbytes' ``int8_vectorwise_dequant`` multiplies by this float32 reciprocal of 127
INV_127 = 7.874015718698502e-3


def _quantize(weight: torch.Tensor) -> tuple[dict, tuple]:
    """The stored tensors (and no params) of ``weight`` in int8 per row."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        raise ModelError(f"int8 quantizes float32, float16 or bfloat16 tensors, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ModelError(f"int8 quantization is per row of a 2-D weight; got shape {tuple(weight.shape)}")
    if not weight.is_meta and not torch.isfinite(weight).all():     # meta (a dry run): shapes, no values
        raise ModelError(f"the weight of shape {tuple(weight.shape)} contains NaN or inf; refusing to quantize it")
    with torch.no_grad():
        w = weight.detach()
        absmax = w.abs().max(dim=1).values.float()
        safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)   # a zero row stays zero
        q = torch.round(w * (127.0 / safe.unsqueeze(-1))).to(torch.int8)
    return {"qweight": q, "absmax": absmax}, ()


def dequantize(tensors, params) -> torch.Tensor:
    """The float32 (out × in) weight: ``q · absmax_row / 127``."""
    qweight, absmax = tensors
    return qweight * absmax.view(-1, 1) * INV_127


SCHEME = Scheme("int8", ("qweight", "absmax"), (), (), _quantize, dequantize)


def quantize(weight: torch.Tensor) -> Quantized:
    """Quantize a 2-D weight (out × in) to int8 per row."""
    return Quantized.of(SCHEME, weight)
