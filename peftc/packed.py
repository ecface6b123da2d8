"""What every quantized weight format (NF4, int8, int4) reports about its size."""
from __future__ import annotations

import torch


class PackedSize:
    """Mixin: a format lists its stored tensors in ``tensors()`` and its weight count in ``numel``."""

    numel: int

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """The bytes a deployment keeps: every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.numel, 1)
