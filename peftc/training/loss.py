"""The training loss on full logits: summed next-token cross-entropy over the labelled positions (the
head-on-labels path is :mod:`peftc.training.headloss`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from peftc.training.data import IGNORE


def labelled_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each position's logits against its label, over the labels that are not IGNORE
    (an encoder-decoder's loss: its decoder's input is already one token behind its labels)."""
    logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labels that are not IGNORE."""
    return labelled_loss_sum(logits[:, :-1], labels[:, 1:])
