"""The training loss on full logits: summed next-token cross-entropy over the labelled positions (the
head-on-labels path is :mod:`peftc.training.headloss`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from peftc.training.data import IGNORE


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labels that are not IGNORE."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
