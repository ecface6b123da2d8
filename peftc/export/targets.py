"""Export targets for a merged model, each verified in ONNX Runtime against its own torch model:

- ``fp32``: the merged weights (LoRA folded onto dequant(W) for a quantized base);
- ``fp16``: the same with every large weight stored in float16 (half the file; computed in float32);
- ``nf4``: the merged weights re-quantized to NF4 (bitsandbytes layout), run by ``com.microsoft.MatMulBnb4``;
- ``int4``: re-quantized to blockwise int4 with zero points, run by ``com.microsoft.MatMulNBits`` (a
  ``--genai`` decoder then computes with int8 activations on the CPU: :func:`peftc.export.genai.int8_activations`).

The re-quantized targets re-quantize the linears the spec's ``quant`` statements quantized (with their
``block`` and ``double_quant``), or when the spec has none every linear but the output head (int4: the head
too, the largest matmul of a small model's step, as the builder quantizes it). Besides the
ONNX Runtime check, each target reports how far its logits move from the float32 merged model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peftc.compiler.compiled import CompiledModel
from peftc.graph.analysis import LinearSite
from peftc.graph.capture import copy_graph_module
from peftc.errors import ExportError
from peftc.export.onnx import ExportResult, _kept, _verify_inputs, export_onnx, signature
from peftc.export.precision import STORED, float32_compute
from peftc.export.lowerings import MATMULBNB4_BLOCKS
from peftc.quant.rewrite import QuantizedWeight, float_weight, quantize_site, quantize_weight

TARGETS = ("fp32", "fp16", "nf4", "int4")
DEFAULT_BLOCK = 64


@dataclass
class TargetResult:
    target: str
    export: ExportResult
    vs_merged: float                 # max |logits - merged fp32 logits| over the verification inputs
    merged_absmax: float             # the largest |logit| of the merged model there
    quantized: int = 0               # linears re-quantized
    bits_per_weight: float | None = None

    def __str__(self) -> str:
        lines = [str(self.export)]
        what = {"fp32": "the merged model itself", "fp16": "float16 weights",
                "nf4": f"NF4 re-quantization of {self.quantized} linears",
                "int4": f"int4 re-quantization of {self.quantized} linears"}[self.target]
        bits = f", {self.bits_per_weight:.3f} bits per quantized weight" if self.bits_per_weight else ""
        lines.append(f"{self.target} logits vs the float32 merged model: max abs diff {self.vs_merged:.3g} "
                     f"(logits up to {self.merged_absmax:.3g}; {what}{bits})")
        return "\n".join(lines)


def requantize_plan(merged, target: str) -> list[tuple[LinearSite, int, bool]]:
    """(site, block, double_quant) for each linear the target re-quantizes."""
    plan = []
    for record in getattr(merged, "folded", []):
        if record.method == "quant":
            options = merged.spec.statements[record.statement].options
            plan.append((record.site, options["block"], options["double_quant"]))
    if plan:
        return plan
    return [(site, DEFAULT_BLOCK, True) for site in merged.sites.linears if site.role != "head" or target == "int4"]


def _copy_model(merged, gm):
    return CompiledModel(gm, spec=merged.spec, sites=merged.sites, records=[], kind=merged.kind,
                         config=merged.config, model_ref=merged.model_ref, signature=merged.signature)


def target_model(merged, target: str, *, block: int | None = None):
    """The torch model a target's ONNX file computes: the reference its ONNX Runtime output is checked against."""
    if target not in TARGETS:
        raise ExportError(f"unknown export target '{target}'; targets: {', '.join(TARGETS)}")
    if target in STORED:
        return float32_compute(merged, STORED[target])
    gm = copy_graph_module(merged.graph_module)
    for i, (site, site_block, double_quant) in enumerate(requantize_plan(merged, target)):
        chosen = block or site_block
        if target == "nf4" and chosen not in MATMULBNB4_BLOCKS:
            raise ExportError(f"block={chosen}: ONNX Runtime's MatMulBnb4 takes NF4 blocks of "
                              f"{', '.join(map(str, MATMULBNB4_BLOCKS))} values; choose one of these")
        stored = quantize_weight(float_weight(gm, site), target, block_size=chosen, double_quant=double_quant)
        quantize_site(gm, site, f"peftc_{target}_{i}", stored)
    gm.graph.lint()
    gm.recompile()
    return float32_compute(_copy_model(merged, gm))


def _logits(model, inputs: tuple) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).float().numpy()


def export_target(merged, path: str | Path, target: str = "fp32", *, block: int | None = None,
                  check=None) -> TargetResult:
    """Build the target's model, export it to ``path`` and verify it in ONNX Runtime. As with
    :func:`peftc.export.onnx.export_onnx` (``check`` is its), ``path`` only ever receives a file that passed
    the ONNX Runtime check; a failure leaves the previous one."""
    model = target_model(merged, target, block=block)
    result = export_onnx(model, path, weights="fp16" if target == "fp16" else "fp32", check=check)
    inputs = _verify_inputs(merged)
    exact = model if target == "fp32" else float32_compute(merged)       # (the fp32 target is that view)
    reference = _logits(exact, inputs)
    real = _kept(signature(merged), inputs, reference)
    moved = 0.0 if model is exact else float(np.abs(_logits(model, inputs) - reference)[real].max())
    quantized = [m for m in model.graph_module.modules() if isinstance(m, QuantizedWeight)]
    bits = (8 * sum(m.nbytes for m in quantized) / sum(m.numel for m in quantized)) if quantized else None
    return TargetResult(target, result, moved, float(np.abs(reference[real]).max()), len(quantized), bits)
