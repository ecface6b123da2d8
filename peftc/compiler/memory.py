"""Where a compiled model's bytes are: base weights by precision (float dtypes, quantized schemes) and the
trainable adapters, with the bits each quantized weight takes (NF4 with double quantization ≈ 4.127)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule

from peftc.quant.rewrite import QuantizedWeight

MIB = 2 ** 20


@dataclass
class Precision:
    bytes: int = 0
    weights: int = 0
    linears: int = 0            # quantized linears (0 for float dtypes)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(self.weights, 1)


@dataclass
class WeightBytes:
    base: dict[str, Precision] = field(default_factory=dict)     # "float32", "nf4", "int8", ...
    adapter_bytes: int = 0
    adapter_weights: int = 0

    @classmethod
    def of(cls, gm: GraphModule) -> "WeightBytes":
        out = cls()
        quantized = {name: m for name, m in gm.named_modules() if isinstance(m, QuantizedWeight)}
        for module in quantized.values():
            entry = out.base.setdefault(module.scheme, Precision())
            entry.bytes += module.nbytes
            entry.weights += module.numel
            entry.linears += 1
        for _name, param in gm.named_parameters():
            size = param.numel() * param.element_size()
            if param.requires_grad:
                out.adapter_bytes += size
                out.adapter_weights += param.numel()
            else:
                entry = out.base.setdefault(str(param.dtype).removeprefix("torch."), Precision())
                entry.bytes += size
                entry.weights += param.numel()
        return out

    @property
    def quantized_weights(self) -> int:
        return sum(p.weights for p in self.base.values() if p.linears)

    @property
    def base_bytes(self) -> int:
        return sum(p.bytes for p in self.base.values())

    def to_dict(self) -> dict:
        return {"base": {k: {"bytes": p.bytes, "weights": p.weights, "linears": p.linears,
                             "bits_per_weight": round(p.bits_per_weight, 4)} for k, p in self.base.items()},
                "adapters": {"bytes": self.adapter_bytes, "weights": self.adapter_weights}}

    def lines(self) -> list[str]:
        rows = [f"{'base weights':<14}{'MiB':>9}   what"]
        for name, p in sorted(self.base.items(), key=lambda kv: (kv[1].linears > 0, kv[0])):
            if p.linears:
                what = (f"{p.weights:,} weights in {p.linears} linears: {p.bits_per_weight:.3f} bits per weight")
            else:
                what = f"{p.weights:,} weights not quantized"
            rows.append(f"  {name:<12}{p.bytes / MIB:>9.2f}   {what}")
        rows.append(f"  {'total':<12}{self.base_bytes / MIB:>9.2f}")
        if self.adapter_weights:
            rows.append(f"{'adapters':<14}{self.adapter_bytes / MIB:>9.2f}   {self.adapter_weights:,} trainable weights")
        return rows
