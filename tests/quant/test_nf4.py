"""NF4 and int8 formats against bitsandbytes (the oracle), and the quantized custom ops."""
import math
import warnings

import bitsandbytes.functional as bnb
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from peftc.quant import int4

from peftc.quant import int8

from peftc.quant import nf4

from peftc.quant import ops as qops
from peftc.errors import ModelError
from numerics import REORDERED, assert_close

#: (shape, block): square, rectangular, a tail block, odd sizes, 1-D, 3-D, a block larger than the tensor
SHAPES = [((64, 64), 64), ((192, 576), 64), ((5, 13), 64), ((7, 97), 32), ((1000, 7), 128),
          ((33,), 64), ((3, 7, 11), 256), ((96, 40), 4096), ((1536, 576), 64)]


def _weight(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


def _reference_dequantize(packed, absmax, block, shape, dtype):
    """bitsandbytes' own torch implementation of NF4 dequantization (its default backend)."""
    plain = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = bnb.get_4bit_type("nf4", device="cpu")
    return plain(packed.reshape(-1), absmax, code, block, shape, dtype)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.slow
def test_nf4_is_bit_identical_to_bitsandbytes(shape, block, double_quant):
    w = _weight(shape)
    packed, state = bnb.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=double_quant)
    ours = nf4.quantize(w, block_size=block, double_quant=double_quant)
    assert ours.packed.dtype == torch.uint8
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert ours.n_blocks == state.absmax.numel()
    if double_quant:
        assert torch.equal(ours.absmax, state.absmax)                 # the 8-bit codes
        assert torch.equal(ours.absmax_scale, state.state2.absmax)     # absmax of each 256 of them
        assert torch.equal(ours.offset, state.offset)
        absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        assert torch.equal(ours.absmax, state.absmax)
        absmax = state.absmax
    assert torch.equal(ours.absmax_float(), absmax)
    assert torch.equal(ours.dequantize(), _reference_dequantize(packed, absmax, block, shape, w.dtype))
    if len(shape) == 1 or shape[-1] % block == 0:
        # bitsandbytes 0.50's AVX2 CPU dequantize kernel looks absmax up per row, which is right only when
        # rows hold whole blocks; there its output must equal ours bit for bit
        assert torch.equal(ours.dequantize(), bnb.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nf4_half_precision_weights_match_bitsandbytes(dtype):
    w = _weight((48, 80), dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4.quantize(w, block_size=64)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert ours.dequantize().dtype == dtype
    absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(ours.dequantize(), _reference_dequantize(packed, absmax, 64, (48, 80), dtype))


def test_first_code_of_a_byte_is_in_the_high_nibble():
    w = torch.zeros(64)
    w[0], w[1] = -1.0, 1.0           # codes 0 (-1.0) and 15 (+1.0)
    q = nf4.quantize(w, block_size=64, double_quant=False)
    assert q.packed[0].item() == 0x0F
    assert q.packed[1].item() == (nf4.ZERO_CODE << 4) | nf4.ZERO_CODE
    assert q.codes()[:2].tolist() == [0, 15]


def test_dynamic_map_and_8bit_blockwise_match_bitsandbytes():
    assert torch.equal(nf4.dynamic_map(), bnb.create_dynamic_map())
    gen = torch.Generator().manual_seed(1)
    for n in (1, 255, 256, 257, 1000, 5184):
        values = torch.randn(n, generator=gen) * 0.01
        values -= values.mean()
        codes, absmax = nf4.quantize_dynamic(values)
        expected, state = bnb.quantize_blockwise(values, blocksize=256)
        assert torch.equal(codes, expected) and torch.equal(absmax, state.absmax)
        assert torch.equal(nf4.dequantize_dynamic(codes, absmax), bnb.dequantize_blockwise(expected, state))


def test_a_zero_block_and_a_constant_absmax_match_bitsandbytes():
    w = _weight((4, 64))
    w[1] = 0.0
    for weight in (w, torch.full((1, 64), 0.5)):        # the second: absmax - mean is all zeros
        packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        ours = nf4.quantize(weight)
        assert torch.equal(ours.packed, packed.reshape(-1))
        assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.absmax_scale, state.state2.absmax)
        assert torch.equal(ours.dequantize(), bnb.dequantize_4bit(packed, state))


def test_double_quant_costs_about_4_127_bits_per_weight():
    q = nf4.quantize(_weight((576, 1536)), block_size=64, double_quant=True)
    assert q.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-3)
    assert q.bits_per_weight <= 4.2
    plain = nf4.quantize(_weight((576, 1536)), block_size=64, double_quant=False)
    assert plain.bits_per_weight == pytest.approx(4.5)
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors().values())


def test_nf4_round_trip_error_is_within_half_a_code_step():
    w = _weight((128, 256))
    q = nf4.quantize(w, block_size=64, double_quant=False)
    widest_gap = (nf4.CODE[1:] - nf4.CODE[:-1]).max()
    bound = q.absmax.repeat_interleave(64).reshape(w.shape) * widest_gap / 2
    assert ((q.dequantize() - w).abs() <= bound + 1e-7).all()


@pytest.mark.parametrize("bad,message", [
    (dict(weight=torch.zeros(4, 4, dtype=torch.int32)), "float32, float16 or bfloat16"),
    (dict(weight=torch.tensor([1.0, float("nan")])), "NaN or inf"),
    (dict(weight=torch.zeros(0, 4)), "empty tensor"),
    (dict(weight=torch.zeros(4, 4), block_size=48), "block size must be a power of two from 16 to 4096, got 48"),
])
def test_nf4_refuses_bad_input_with_a_clear_message(bad, message):
    with pytest.raises(ModelError, match=message):
        nf4.quantize(**bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 64), (5, 13), (192, 576)])
def test_int8_per_row_matches_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype)
    q, stats, _ = bnb.int8_vectorwise_quant(w.clone())
    ours = int8.quantize(w)
    assert torch.equal(ours.qweight, q) and torch.equal(ours.absmax, stats)
    assert torch.equal(ours.dequantize(), bnb.int8_vectorwise_dequant(q, stats).to(dtype))


def test_int8_refuses_a_weight_that_is_not_2d():
    with pytest.raises(ModelError, match="per row of a 2-D weight"):
        int8.quantize(torch.zeros(8))


def test_int4_round_trip_and_layout():
    w = _weight((40, 100))                              # 100 is not a multiple of the block: padded
    q = int4.quantize(w, block_size=32)
    assert q.packed.shape == (40, 4, 16) and q.scales.shape == (40, 4) and q.zero_points.shape == (40, 2)
    step = q.scales.repeat_interleave(32, dim=1)[:, :100]
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-7).all()
    zero = torch.zeros(3, 32)
    assert torch.equal(int4.quantize(zero).dequantize(), zero)


# --- the custom ops ------------------------------------------------------------------------------------

def _op_inputs(scheme, w):
    if scheme == "nf4":
        q = nf4.quantize(w, 64, True)
        return [q.packed, q.absmax, q.absmax_scale, q.offset], [list(w.shape), 64], q.dequantize()
    if scheme == "int8":
        q8 = int8.quantize(w)
        return [q8.qweight, q8.absmax], [], q8.dequantize()
    q4 = int4.quantize(w, 32)
    return [q4.packed, q4.scales, q4.zero_points], [list(w.shape), 32], q4.dequantize()


def _call(scheme, layout, x, tensors, bias, params):
    op = qops.op(scheme, layout)
    if layout == "linear":
        return op(x, *tensors, bias, *params)
    return op(bias, x, *tensors, *params)


@pytest.mark.parametrize("layout", qops.LAYOUTS)
@pytest.mark.parametrize("scheme", list(qops.SCHEMES))
def test_quantized_op_computes_the_dequantized_linear_and_its_input_gradient(scheme, layout):
    w = _weight((24, 80), seed=3)
    tensors, params, dequantized = _op_inputs(scheme, w)
    bias = torch.randn(24, requires_grad=True)
    shape = (6, 80) if layout == "addmm" else (2, 3, 80)
    x = torch.randn(shape, requires_grad=True)
    y = _call(scheme, layout, x, tensors, bias, params)
    expected = torch.nn.functional.linear(x, dequantized, bias)
    why = "the op dequantizes, then runs torch's own kernels: sums of 80 (or 24, or 6) products reordered"
    assert_close(y, expected, rel=REORDERED, why=why)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert_close(x.grad, grad @ dequantized, rel=REORDERED, why=why)
    assert_close(bias.grad, grad.reshape(-1, 24).sum(0), rel=REORDERED, why=why)
    assert all(not t.requires_grad and t.grad is None for t in tensors if t is not None)


def test_quantized_op_is_one_node_under_torch_export():
    w = _weight((24, 80))
    tensors, params, _ = _op_inputs("nf4", w)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, t in enumerate(tensors):
                self.register_buffer(f"t{i}", t)

        def forward(self, x):
            return qops.op("nf4", "linear")(x, self.t0, self.t1, self.t2, self.t3, None, *params)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(Layer(), (torch.randn(2, 5, 80),),
                                 dynamic_shapes={"x": {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}})
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [qops.op("nf4", "linear")]
    assert tuple(ep.module()(torch.randn(3, 7, 80)).shape) == (3, 7, 24)


def test_bits_of_the_formats_are_what_their_layouts_say():
    w = _weight((256, 512))
    assert int8.quantize(w).bits_per_weight == pytest.approx(8 + 32 / 512)
    assert int4.quantize(w, 64).bits_per_weight == pytest.approx(4 + 32 / 64 + 4 / 64)
    assert math.isclose(nf4.quantize(w, 64, False).bits_per_weight, 4.5)
