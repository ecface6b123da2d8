"""The engine protocol shared by the adapter bank and the server: one KV-cache decoder step over a batch whose
rows may use different adapters (``__base__`` for none), as :mod:`peftc.serve.bank` implements it and
:mod:`peftc.serve.scheduler` drives it.

Positions are ``cumsum(mask) - 1`` inside the decoder, so a row whose :meth:`Engine.start` gave P prefix
columns has its first real token at position P (as HF PEFT's prefix and prompt tuning place them), and left
padding is harmless. Rows join a running batch by left-padding their cache to the batch's past length (mask
zeros there)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

#: the adapter name meaning "no adapter"
BASE = "__base__"


@runtime_checkable
class Engine(Protocol):
    """One KV-cache decoder step over a batch whose rows may use different adapters."""

    names: list[str]       # served adapter names, BASE first
    max_length: int        # the longest sequence (past + new) a row may reach

    def start(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """A row's cache before its first token: per attention, key then value, each float32
        (1, kv_heads, P, head_dim), and its attention mask (1, P) of ones. P > 0 only for a prefix or
        soft-prompt adapter (its keys and values are a constant past); else P = 0. Unknown name -> KeyError."""
        ...

    def task_ids(self, names: list[str]) -> np.ndarray:
        """(B,) int64, one per row: the index of each row's adapter."""
        ...

    def __call__(self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray],
                 task_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, S) int64 new tokens; mask (B, P+S) int64 over every position so far, past ones first (rows
        left-padded with zeros where they are shorter); past: per attention key, value (B, h, P, d). Returns
        logits (B, S, V) float32 and the present cache (B, h, P+S, d) per attention, key then value."""
        ...


class BaseEngine:
    """The :class:`Engine` of one decoder step without adapters (``peftc serve OUT/`` with no ``--adapter``):
    an :class:`~peftc.export.genai.OnnxStep` or :class:`~peftc.export.genai.TorchStep`, every row ``BASE``."""

    def __init__(self, step, max_length: int):
        self.step = step
        self.names = [BASE]
        self.max_length = int(max_length)

    def start(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        self.task_ids([name])
        return self.step.empty(1), np.ones((1, 0), np.int64)

    def task_ids(self, names: list[str]) -> np.ndarray:
        unknown = [n for n in names if n != BASE]
        if unknown:
            raise KeyError(unknown[0])
        return np.zeros(len(names), np.int64)

    def __call__(self, ids, mask, past, task_ids):
        return self.step(ids, mask, past)
