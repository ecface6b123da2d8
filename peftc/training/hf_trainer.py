"""A CompiledModel with the calling convention of the ``transformers`` Trainer."""
from __future__ import annotations

import torch
from torch import nn

from peftc.training.data import IGNORE
from peftc.training.headloss import head_split
from peftc.training.loss import token_loss_sum


class CausalLMWithLoss(nn.Module):
    """A thin wrapper that gives a CompiledModel the calling convention of the ``transformers`` Trainer:
    ``forward(input_ids, attention_mask=None, labels=None)`` returns ``{"loss"}`` with labels and
    ``{"logits"}`` without, the loss being the mean next-token cross-entropy over labels that are not -100
    (labels are *not* pre-shifted, as in transformers). With labels, the head runs on the labelled positions
    only (:mod:`peftc.training.headloss`), so there are no logits to return; a spec that rewrites the head gets the
    loss from full logits and returns both, as before. The wrapped model is ``.model``; save the adapter with
    ``.model.save_hf_peft(dir)``. ``accepts_loss_kwargs`` makes the Trainer pass ``num_items_in_batch``, so
    with gradient accumulation the loss is the mean over the whole accumulated batch, as in ``peftc train``."""
    accepts_loss_kwargs = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # outside the module tree: the split holds self.model, whose parameters are registered already
        object.__setattr__(self, "split", head_split(model))

    def forward(self, input_ids, attention_mask=None, labels=None, num_items_in_batch=None):
        if labels is None:
            return {"logits": self.model(input_ids, attention_mask)}
        if self.split is not None:
            total, out = self.split.loss_sum(self.split(input_ids, attention_mask), labels), {}
        else:
            logits = self.model(input_ids, attention_mask)
            total, out = token_loss_sum(logits, labels), {"logits": logits}
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE).sum()
        out["loss"] = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        return out
