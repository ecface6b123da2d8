"""The rows of a mixed-task batch: each adapter's starting cache and task id (:class:`RowCaches`, shared by the
adapter bank's torch and ONNX engines), and a batch's cache before its first tokens (:func:`join_starts`)."""
from __future__ import annotations

import numpy as np


class RowCaches:
    """What every bank engine shares: the names (``__base__`` first, task id = index), each name's starting
    cache, and :meth:`start` / :meth:`task_ids` of the engine protocol."""

    def __init__(self, names: list[str], pasts: dict[str, list[np.ndarray]], heads: list[tuple[int, int]],
                 max_length: int):
        self.names = list(names)
        self.max_length = max_length
        self.heads = heads
        self._ids = {name: i for i, name in enumerate(self.names)}
        self._pasts = pasts

    def start(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        if name not in self._ids:
            raise KeyError(name)
        past = self._pasts.get(name) or [np.zeros((1, h, 0, d), np.float32) for h, d in self.heads for _ in (0, 1)]
        return [p.copy() for p in past], np.ones((1, past[0].shape[2]), np.int64)

    def task_ids(self, names: list[str]) -> np.ndarray:
        return np.array([self._ids[name] for name in names], np.int64)

    def prefix_length(self, name: str) -> int:
        """P, the positions a name's starting cache takes from :attr:`max_length`."""
        return self.start(name)[1].shape[1]


def join_starts(engine, names: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """The batch's cache before its first tokens: each row's :meth:`start`, left-padded to the longest with
    zeros (mask zeros there). Returns (per attention key, value (B, h, P, d)), mask (B, P))."""
    starts = [engine.start(name) for name in names]
    width = max(mask.shape[1] for _, mask in starts)
    past = [np.concatenate([np.pad(cache[i], ((0, 0), (0, 0), (width - mask.shape[1], 0), (0, 0)))
                            for cache, mask in starts]) for i in range(len(starts[0][0]))]
    mask = np.concatenate([np.pad(mask, ((0, 0), (width - mask.shape[1], 0))) for _, mask in starts])
    return past, mask
