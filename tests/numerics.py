"""The suite's one way to compare numbers (in the spirit of onnxscript's ``assert_numerically_equal``):
every bound is relative to the magnitude of the expected tensor, and every call site says why its bound is
what it is. Float32 results differ in the last bits between CPUs (Intel and AMD kernels sum in different
orders), so no bound here is an absolute number of bits that one machine happened to give."""
from __future__ import annotations

import os

import numpy as np
import torch

#: float32 machine epsilon, 1.19e-07: the unit of every bound below
EPS = float(torch.finfo(torch.float32).eps)

#: The same float32 arithmetic in another order (a fused matmul, split chunks, another thread count):
#: each output is a sum of a few hundred products, so its rounding differs by at most a few hundred eps of
#: the largest magnitude; 256 eps (3.1e-5) bounds it.
REORDERED = 256 * EPS
#: A gradient of such a result: it flows back through every layer after the reordered sum, and the
#: difference compounds; seen up to 1.6e-5 of the gradient's magnitude (136 eps) on an EPYC, 2048 eps
#: (2.4e-4) leaves a margin of fifteen and is still far below any real error (a wrong slice or scale is O(1)).
REORDERED_GRADIENT = 2048 * EPS
#: The same function by another implementation (HF PEFT's modules, a merged weight, a rewritten graph)
#: through a few layers: reordered sums plus one rounding of each folded weight, compounded by the layers;
#: seen up to 3.3e-6 of the output's magnitude on an EPYC (merging LoRA on tiny-llama; 28 eps), so 3e-5
#: (250 eps) leaves a margin of nine, while a wrong scale or slice is off by 1e-2 or more.
SAME_FUNCTION = 3e-5
#: ONNX Runtime against torch: other kernels (its own GEMM, fused softmax/layer norm) for the same float32
#: graph; seen up to 2.1e-6 of the largest output on an EPYC (SmolLM2-135M), 2e-5 leaves a margin of nine.
ONNX_RUNTIME = 2e-5


def half_reordered(dtype: torch.dtype) -> float:
    """The bound of :data:`REORDERED` in a half-precision ``dtype``: the same arithmetic in another order
    (HF PEFT adds each A projection alone where peftc fuses those of one input) rounds each bf16/fp16
    output differently by a few eps of that dtype; seen up to 2.1 eps of the largest logit (fp16, LoRA on
    every linear of tiny-llama, on an EPYC), so 8 eps leaves a margin of four, while the adapters' effect
    on the same logits is 130-1500 eps."""
    return 8 * float(torch.finfo(dtype).eps)


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return torch.as_tensor(x).detach().to(torch.float64)


def _record(kind: str, ratio: float, rel: float) -> None:
    path = os.environ.get("PEFTC_NUMERICS_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{kind}\t{ratio:.3g}\t{rel:g}\n")


def assert_close(actual, expected, *, rel: float, why: str, name: str = "") -> None:
    """``max|actual - expected| <= rel * max|expected|``; ``why`` is the reason for ``rel``."""
    actual, expected = _as_tensor(actual), _as_tensor(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert scale > 0, f"{name}: the expected tensor is all zeros, so a relative bound says nothing"
    diff = float((actual - expected).abs().max())
    _record("close", diff / scale, rel)
    assert diff <= rel * scale, (f"{name + ': ' if name else ''}max abs diff {diff:.3g} is "
                                 f"{diff / scale:.3g} of max|expected| {scale:.3g}, over {rel:g} ({why})")


def assert_differs(actual, expected, *, rel: float, why: str, name: str = "") -> None:
    """``max|actual - expected| > rel * max|expected|``: what was inserted really changes the result."""
    actual, expected = _as_tensor(actual), _as_tensor(expected)
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    _record("differs", diff / scale, rel)
    assert diff > rel * scale, (f"{name + ': ' if name else ''}max abs diff {diff:.3g} is only "
                                f"{diff / scale:.3g} of max|expected| {scale:.3g}, not over {rel:g} ({why})")


def assert_export_close(result, *, rel: float = ONNX_RUNTIME, why: str = "ONNX Runtime's kernels") -> None:
    """An :class:`peftc.export.onnx.ExportResult`'s ONNX Runtime check, relative to its largest output."""
    assert result.max_abs_diff is not None and result.reference_absmax, "the export was not verified"
    ratio = result.max_abs_diff / result.reference_absmax
    _record("export", ratio, rel)
    assert ratio <= rel, (f"ONNX Runtime vs torch: max abs diff {result.max_abs_diff:.3g} is {ratio:.3g} of "
                          f"the largest output {result.reference_absmax:.3g}, over {rel:g} ({why})")
