"""Capture a model as an aten graph with torch.export (non-strict), dynamic batch and sequence length.

The captured module takes ``(input_ids, attention_mask)`` and returns logits for a causal LM or the last
hidden state for an encoder. Module paths in node metadata and weight targets carry the prefix
``hf.``, which :func:`module_path` strips so that paths are the Hugging Face model's own names."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.export import Dim
from torch.fx import GraphModule, Node

from .errors import ModelError

PREFIX = "hf."
INPUT_NAMES = ("input_ids", "attention_mask")


class _Wrapper(torch.nn.Module):
    def __init__(self, hf: torch.nn.Module, output: str):
        super().__init__()
        self.hf = hf
        self.output = output

    def forward(self, input_ids, attention_mask):
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return getattr(out, self.output)


@dataclass
class Captured:
    gm: GraphModule
    kind: str            # "causal-lm" or "encoder"
    config: object       # the Hugging Face config
    seconds: float


def example_inputs(batch: int = 2, seq: int = 8, vocab: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


def dynamic_shapes(max_seq: int):
    batch = Dim("batch", min=1, max=4096)
    seq = Dim("sequence", min=1, max=max(2, max_seq))
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def max_positions(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return 8192


def capture(model: torch.nn.Module) -> Captured:
    """Capture ``model`` (a transformers model) as a GraphModule with dynamic batch and sequence."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no .config: peftc captures Hugging Face models")
    was_training = model.training
    model.eval()
    ids, mask = example_inputs(vocab=min(32, getattr(config, "vocab_size", 32) or 32))
    with torch.no_grad():
        probe = model(input_ids=ids, attention_mask=mask, use_cache=False)
    if getattr(probe, "logits", None) is not None:
        kind, output = "causal-lm", "logits"
    elif getattr(probe, "last_hidden_state", None) is not None:
        kind, output = "encoder", "last_hidden_state"
    else:
        raise ModelError(f"{type(model).__name__} returns neither logits nor last_hidden_state")
    start = time.perf_counter()
    try:
        ep = torch.export.export(_Wrapper(model, output), (ids, mask),
                                 dynamic_shapes=dynamic_shapes(max_positions(config)), strict=False)
    except Exception as exc:
        raise ModelError(f"torch.export could not capture {type(model).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    for param in gm.parameters():
        param.requires_grad_(False)
    return Captured(gm=gm, kind=kind, config=config, seconds=time.perf_counter() - start)


def module_path(node: Node) -> str | None:
    """The Hugging Face module path of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return strip_prefix(path)


def module_type(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    typ = list(stack.values())[-1][1]
    return typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))


def strip_prefix(path: str) -> str:
    return path[len(PREFIX):] if path.startswith(PREFIX) else path
