"""Blockwise asymmetric int4 in ONNX Runtime's ``com.microsoft.MatMulNBits`` layout (bits=4).

A weight W (N × K, out × in) is cut along K into blocks of ``block_size`` (the last one zero-padded);
each block has a float32 scale and a 4-bit zero point, and ``W[n, k] = (q[n, k] - zp) · scale``. The
range of each block includes 0, so zero (and the padding) is exact. Layouts, as MatMulNBits reads them:
``packed`` uint8 (N, blocks, block_size/2) with two codes a byte, the first in the *low* nibble;
``scales`` float32 (N, blocks); ``zero_points`` uint8 (N, ceil(blocks/2)), also low nibble first."""
from __future__ import annotations

import torch

from peftc.errors import ModelError
from peftc.quant.scheme import FLOAT_DTYPES, Quantized, Scheme


def _unpack_low_first(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def dequantize(tensors, params) -> torch.Tensor:
    """The float32 (N × K) weight: ``(q - zp) · scale`` per block."""
    packed, scales, zero_points = tensors
    (_out_features, in_features), _block = params
    n, blocks, _ = packed.shape
    q = _unpack_low_first(packed).float()                                  # (N, blocks, block)
    zp = _unpack_low_first(zero_points)[:, :blocks].float()                # (N, blocks)
    w = (q - zp.unsqueeze(-1)) * scales.unsqueeze(-1)
    return w.reshape(n, -1)[:, :in_features]


def _quantize(weight: torch.Tensor, block_size: int = 32) -> tuple[dict, tuple]:
    """The stored tensors and params of ``weight`` in int4 (see :func:`quantize`)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ModelError(f"int4 block size must be a power of two >= 16 (MatMulNBits), got {block_size}")
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES or weight.dim() != 2:
        raise ModelError(f"int4 quantizes a 2-D float weight; got {getattr(weight, 'dtype', type(weight).__name__)} "
                         f"of shape {tuple(getattr(weight, 'shape', ()))}")
    if not torch.isfinite(weight).all():
        raise ModelError(f"the weight of shape {tuple(weight.shape)} contains NaN or inf; refusing to quantize it")
    with torch.no_grad():
        n, k = weight.shape
        blocks = -(-k // block_size)
        w = torch.nn.functional.pad(weight.detach().float(), (0, blocks * block_size - k)).reshape(n, blocks, block_size)
        low = w.amin(dim=-1).clamp(max=0)
        high = w.amax(dim=-1).clamp(min=0)
        scales = (high - low) / 15
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        zp = torch.clamp(torch.round(-low / scales), 0, 15)
        q = torch.clamp(torch.round(w / scales.unsqueeze(-1)) + zp.unsqueeze(-1), 0, 15).to(torch.uint8)
        packed = q[..., 0::2] | (q[..., 1::2] << 4)
        zp8 = zp.to(torch.uint8)
        if blocks % 2:
            zp8 = torch.nn.functional.pad(zp8, (0, 1))
        zero_points = zp8[:, 0::2] | (zp8[:, 1::2] << 4)
    stored = {"packed": packed.contiguous(), "scales": scales.contiguous(), "zero_points": zero_points.contiguous()}
    return stored, ((n, k), block_size)


SCHEME = Scheme("int4", ("packed", "scales", "zero_points"), ("int[] shape", "int block_size"), ("block_size",),
                _quantize, dequantize)


def quantize(weight: torch.Tensor, block_size: int = 32) -> Quantized:
    """Round-to-nearest int4 of a 2-D weight (out × in), blockwise along the input dimension."""
    return Quantized.of(SCHEME, weight, block_size=block_size)
