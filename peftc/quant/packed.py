"""What every quantized weight format (NF4, int8, int4) reports about its size."""
from __future__ import annotations

from typing import Callable

import torch


class PackedSize:
    """Mixin for a format class that defines ``tensors()`` (its stored tensors by name) and ``numel``."""

    numel: int
    tensors: Callable[[], dict[str, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        """The bytes a deployment keeps: every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.numel, 1)
