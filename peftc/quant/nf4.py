"""NF4 (4-bit NormalFloat, QLoRA) in bitsandbytes' exact layout, written with torch ops only.

``quantize(weight, block_size=64, double_quant=True)`` gives the same bytes and the same dequantized
values as ``bitsandbytes.functional.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
compress_statistics=double_quant)`` on the CPU (the tests check this against bitsandbytes):

- the weight is flattened row-major and cut into blocks of ``block_size`` values, the last one possibly
  shorter (a *tail* block); each block is scaled by its absolute maximum into [-1, 1] and each value is
  mapped to the nearest of 16 fixed code values (``CODE``; a value half-way between two codes takes the
  lower one); two codes go in a byte, the first in the high nibble; an odd count is padded with the code
  of 0.0;
- double quantization stores the per-block absmax constants in 8 bits: their mean (``offset``) is taken
  off, and the rest is quantized in blocks of 256 with bitsandbytes' signed 8-bit dynamic map
  (``dynamic_map()``), each block with its own float32 absmax.

With block 64 and double quantization that is 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight."""
from __future__ import annotations

import functools
import math

import torch

from peftc.errors import ModelError
from peftc.quant.scheme import FLOAT_DTYPES, Quantized, Scheme

#: bitsandbytes ``get_4bit_type("nf4")``: quantiles of N(0, 1) scaled to [-1, 1], 0.0 at index 7
CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
ZERO_CODE = 7
#: the block size of the second quantization (of the absmax constants), fixed by bitsandbytes
DOUBLE_QUANT_BLOCK = 256
#: block sizes this module accepts: powers of two; bitsandbytes itself takes 32..4096
BLOCK_SIZES = tuple(2 ** e for e in range(4, 13))


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``: 256 sorted
    float32 values in [-1, 1], dense near 0 — the 8-bit code of the double-quantized absmax."""
    data: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        items = 2 ** (i + non_sign_bits - exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer does not search the code: it maps a normalised value v to one of
    65536 bins, ``trunc(((v + 1) · 0.5) · 65535 + 0.5)``, and each bin to the first code whose midpoint
    with the next code is not below the bin's left edge. Reproducing that table reproduces its bytes."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    edges = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535
    return torch.searchsorted(midpoints, edges, side="left").to(torch.uint8)


def _blocks(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``flat`` as (full blocks × block) and the tail (or None)."""
    full = flat.numel() - flat.numel() % block
    head = flat[:full].reshape(-1, block)
    return head, (flat[full:] if full < flat.numel() else None)


def quantize_dynamic(values: torch.Tensor, block: int = DOUBLE_QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic map, as bitsandbytes' CPU ``quantize_blockwise``:
    returns (uint8 codes, float32 absmax per block). A block of zeros gets absmax 0 and code 0."""
    flat = values.reshape(-1).float()
    head, tail = _blocks(flat, block)
    parts = [head.abs().amax(dim=1)] if head.numel() else []
    if tail is not None:
        parts.append(tail.abs().amax().reshape(1))
    absmax = torch.cat(parts) if parts else torch.zeros(0, device=flat.device)
    per_value = absmax.repeat_interleave(block)[:flat.numel()]
    safe = torch.where(per_value == 0, torch.ones_like(per_value), per_value)
    normed = torch.clamp(flat * (1.0 / safe), -1, 1)
    bins = (((normed + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    codes = _dynamic_lut().to(bins.device)[bins]
    codes = torch.where(per_value == 0, torch.zeros_like(codes), codes)
    return codes, absmax


def dequantize_dynamic(codes: torch.Tensor, absmax: torch.Tensor, block: int = DOUBLE_QUANT_BLOCK) -> torch.Tensor:
    """``code[q] · absmax`` per block, in float32 (bitsandbytes' ``dequantize_blockwise``)."""
    scale = absmax.repeat_interleave(block)[:codes.numel()]
    return dynamic_map()[codes.reshape(-1).long()] * scale


def absmax_float(absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
                 absmax_offset: torch.Tensor | None) -> torch.Tensor:
    """The float32 absmax of each block, after undoing the double quantization (if there was one)."""
    if absmax_scale is None:
        return absmax
    return dequantize_dynamic(absmax, absmax_scale) + absmax_offset


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Two codes per byte, the first in the high nibble; the pad nibble of an odd count is dropped."""
    flat = packed.reshape(-1)
    pairs = torch.stack(((flat >> 4) & 0xF, flat & 0xF), dim=1)
    return pairs.reshape(-1)[:numel].long()


@functools.cache
def _pairs() -> torch.Tensor:
    """Both code values of each byte, high nibble first: a 256 × 2 table, so unpacking is one gather."""
    byte = torch.arange(256)
    return torch.stack((CODE[byte >> 4], CODE[byte & 0xF]), dim=1)


def dequantize(tensors, params) -> torch.Tensor:
    """The float32 weight of ``shape``: ``CODE[c] · absmax`` of its block for each code."""
    packed, absmax, absmax_scale, absmax_offset = tensors
    shape, block = params
    n = math.prod(shape)
    values = _pairs().index_select(0, packed.reshape(-1).int()).view(-1)
    per_block = absmax_float(absmax, absmax_scale, absmax_offset)
    if n % block == 0:     # in place: the transient memory of a forward is the weight, once
        return values.view(-1, block).mul_(per_block.view(-1, 1)).view(*shape)
    return values[:n].mul_(per_block.repeat_interleave(block)[:n]).view(*shape)


def check_block(block_size: int) -> None:
    """Refuse a block size this module does not quantize with."""
    if block_size not in BLOCK_SIZES:
        raise ModelError(f"NF4 block size must be a power of two from {BLOCK_SIZES[0]} to {BLOCK_SIZES[-1]}, "
                         f"got {block_size}")


def _quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> tuple[dict, tuple]:
    """The stored tensors and params of ``weight`` in NF4 (see :func:`quantize`)."""
    check_block(block_size)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        raise ModelError(f"NF4 quantizes float32, float16 or bfloat16 tensors, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.numel() == 0:
        raise ModelError(f"cannot quantize an empty tensor of shape {tuple(weight.shape)}")
    with torch.no_grad():
        flat = weight.detach().reshape(-1).float()
        head, tail = _blocks(flat, block_size)
        # the same expressions as bitsandbytes' quantize_4bit kernel (backends/default/ops.py), so the same
        # float32 roundings: full blocks multiply by the reciprocal, the tail divides
        absmax = head.abs().max(dim=-1)[0]
        scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
        if tail is not None:
            tail_max = tail.abs().max().clamp(min=1e-38)
            absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
            scaled = torch.cat([scaled, torch.clamp(tail / tail_max, -1, 1)])
        # a NaN or inf anywhere makes its block's absmax one (a weight on the meta device has no values:
        # a dry-run compile quantizes shapes only)
        if not weight.is_meta and not torch.isfinite(absmax).all():
            raise ModelError(f"the weight of shape {tuple(weight.shape)} contains NaN or inf; "
                             "refusing to quantize it")
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        midpoints = ((CODE[:-1] + CODE[1:]) / 2).to(scaled.device)
        codes = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
        packed = (codes[::2] << 4) | codes[1::2]
        stored = {"packed": packed, "absmax": absmax, "absmax_scale": None, "absmax_offset": None}
        if double_quant:
            offset = absmax.mean()
            stored["absmax"], stored["absmax_scale"] = quantize_dynamic(absmax - offset)
            stored["absmax_offset"] = offset
    return stored, (tuple(weight.shape), block_size)


SCHEME = Scheme("nf4", ("packed", "absmax", "absmax_scale?", "absmax_offset?"), ("int[] shape", "int block_size"),
                ("block_size", "double_quant"), _quantize, dequantize)


class NF4Weight(Quantized):
    """A weight in NF4. ``packed``: uint8, ceil(numel/2) bytes. Without double quantization ``absmax`` is
    float32 per block; with it, ``absmax`` holds uint8 codes, ``absmax_scale`` the float32 absmax of each
    256 of them and ``offset`` the float32 mean that was taken off (stored as ``absmax_offset``)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.params[0]

    @property
    def block_size(self) -> int:
        return self.params[1]

    @property
    def offset(self) -> torch.Tensor | None:
        return self.stored["absmax_offset"]

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)

    def absmax_float(self) -> torch.Tensor:
        """The float32 absmax of each block (after undoing the double quantization)."""
        return absmax_float(self.stored["absmax"], self.stored["absmax_scale"], self.offset)

    def codes(self) -> torch.Tensor:
        """The 4-bit code of each value, flat (int64)."""
        return unpack(self.stored["packed"], self.numel)


def quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``weight`` (float32, float16 or bfloat16, any shape) to NF4, bit for bit as bitsandbytes'
    ``quantize_4bit(..., quant_type="nf4")``."""
    return NF4Weight.of(SCHEME, weight, block_size=block_size, double_quant=double_quant)
