"""Continuous batching over an :class:`~peftc.serve.engine.Engine`, in one worker thread.

Requests wait in a bounded queue (:class:`ServeError` 429 when it is full). Between two decoder steps the
worker takes waiting requests into the running batch, up to ``max_batch`` rows: each is prefilled alone
(its adapter's constant past from ``engine.start``, then its whole prompt), and its cache is left-padded to
the batch's past length, mask zeros there, so rows of any adapter and length step together. Every step feeds
each row its last sampled token; a row leaves the batch when it samples an end-of-sequence token, when its
text reaches a stop string, after ``max_tokens``, when its request is cancelled or past its timeout.
Columns that no remaining row uses are cut from the left, so the batch's past is as long as its longest row.

Sampling is per request, in numpy: greedy at temperature 0, else softmax(logits / temperature) restricted to
the smallest set of tokens whose probability reaches ``top_p``, drawn from the request's own generator
(``seed``), so a seeded request gives the same tokens whatever else is in the batch.

Each request reports through its ``emit`` callback, called from the worker thread: :class:`Delta` (new text,
held back while it may be the start of a stop string or an incomplete UTF-8 character), then one
:class:`Done` or :class:`Failed`."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from peftc.errors import PeftcError
from peftc.serve.engine import Engine


class ServeError(PeftcError):
    """A request the server refuses or could not finish: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    finish_reason: str          # "stop" (eos or a stop string) or "length" (max_tokens or the context)
    completion_tokens: int


@dataclass
class Failed:
    error: ServeError


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token from a row's last logits: the argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = order[:int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        nucleus = np.zeros_like(p)
        nucleus[keep] = p[keep]
        p = nucleus / nucleus.sum()
    return int(rng.choice(p.size, p=p))


@dataclass(eq=False)
class Request:
    """One generation: ``prompt`` token ids for adapter ``name``; ``emit`` receives its events."""
    name: str
    prompt: list[int]
    max_tokens: int
    emit: Callable[[object], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    sent: str = ""                  # the text emitted so far
    cancelled: bool = False
    finished: bool = False
    deadline: float = float("inf")

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def cancel(self) -> None:
        """Leave the batch at the next step, with no further event (the client has gone)."""
        self.cancelled = True


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` may still change or start a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))         # an incomplete UTF-8 character decodes as U+FFFD
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                held = max(held, k)
                break
    return held


class Scheduler:
    """The worker thread and its queue (see the module doc). ``decode`` turns a request's generated ids
    into text; ``eos_ids`` end a row without being part of its text."""

    def __init__(self, engine: Engine, decode: Callable[[list[int]], str], eos_ids, *, max_batch: int = 8,
                 queue: int = 64, timeout: float = 300.0):
        self.engine, self.decode, self.eos_ids = engine, decode, {int(i) for i in eos_ids}
        self.max_batch, self.queue_size, self.timeout = max_batch, queue, timeout
        self.prefix = {name: engine.start(name)[1].shape[1] for name in engine.names}
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closing = self._cancelling = False
        self._rows: list[Request] = []
        self._past: list[np.ndarray] = []
        self._mask = np.zeros((0, 0), np.int64)
        self._thread = threading.Thread(target=self._run, name="peftc-serve-engine", daemon=True)

    # --- the server's side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def check(self, name: str, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse (400) a request that cannot fit the context: its prompt, its adapter's prefix and
        ``max_tokens`` beyond ``engine.max_length``, or an empty prompt."""
        prefix, context = self.prefix[name], self.engine.max_length
        if prompt_tokens < 1:
            raise ServeError(400, "the prompt is empty: give at least one token", param="prompt")
        if max_tokens < 1:
            raise ServeError(400, f"max_tokens is {max_tokens}: give at least 1", param="max_tokens")
        total = prefix + prompt_tokens + max_tokens
        if total > context:
            extra = f", {prefix} in the adapter's prefix" if prefix else ""
            raise ServeError(400, f"This model's maximum context length is {context} tokens. However, you "
                             f"requested {total} tokens ({prompt_tokens} in the prompt{extra}, {max_tokens} in the "
                             "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                             code="context_length_exceeded")

    def room(self, name: str, prompt_tokens: int) -> int:
        """The most tokens a request may generate after its prompt."""
        return self.engine.max_length - self.prefix[name] - prompt_tokens

    def submit(self, request: Request) -> None:
        """Queue a request (checked with :meth:`check`); 429 when the queue is full, 503 when closing."""
        self.check(request.name, len(request.prompt), request.max_tokens)
        with self._cond:
            if self._closing:
                raise ServeError(503, "the server is shutting down", kind="server_error")
            if len(self._waiting) >= self.queue_size:
                raise ServeError(429, f"the server's queue is full ({self.queue_size} requests wait for a place "
                                 f"in the batch of {self.max_batch}); retry later", kind="rate_limit_error",
                                 code="queue_full")
            request.deadline = time.monotonic() + self.timeout
            self._waiting.append(request)
            self._cond.notify()

    def close(self, cancel: bool = True) -> None:
        """Stop taking requests; finish the queued and running ones, or (``cancel``) fail them with 503; wait
        for the worker."""
        with self._cond:
            self._closing = True
            self._cancelling = self._cancelling or cancel
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def busy(self) -> int:
        """Requests queued or running."""
        return len(self._waiting) + len(self._rows)

    # --- the worker ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while self._admit():
            if self._rows:
                self._step()

    def _admit(self) -> bool:
        """Wait for work, drop what was cancelled or expired, take waiting requests into the batch (prefilled).
        False when the worker is to stop."""
        with self._cond:
            while not (self._waiting or self._rows or self._closing):
                self._cond.wait()
            if self._cancelling:
                for request in [*self._waiting, *self._rows]:
                    self._fail(request, ServeError(503, "the server shut down before the request finished",
                                                   kind="server_error"))
                self._select([])
            self._waiting = deque(r for r in self._waiting if self._live(r))
            if self._closing and not self._waiting and not self._rows:
                return False
            joining = []
            while self._waiting and len(self._rows) + len(joining) < self.max_batch:
                joining.append(self._waiting.popleft())
        for request in joining:
            self._prefill(request)
        return True

    def _live(self, request: Request) -> bool:
        """False (failing it) for a request that was cancelled, finished or ran past its deadline."""
        if request.cancelled or request.finished:
            request.finished = True
            return False
        if time.monotonic() > request.deadline:
            self._fail(request, ServeError(504, f"the request ran past the server's timeout of {self.timeout:g} s",
                                           kind="timeout", code="timeout"))
            return False
        return True

    def _prefill(self, request: Request) -> None:
        try:
            past, mask = self.engine.start(request.name)
            ids = np.array([request.prompt], np.int64)
            mask = np.concatenate([mask.astype(np.int64), np.ones((1, ids.shape[1]), np.int64)], axis=1)
            logits, present = self.engine(ids, mask, past, self.engine.task_ids([request.name]))
        except Exception as exc:        # one bad row must not stop the server
            self._fail(request, ServeError(500, f"the decoder failed on the prompt: {exc}", kind="server_error"))
            return
        self._accept(request, sample(logits[0, -1], request.temperature, request.top_p, request.rng))
        if not request.finished:
            self._join(request, present, mask)

    def _join(self, request: Request, present: list[np.ndarray], mask: np.ndarray) -> None:
        """Add a prefilled row to the batch, left-padding the shorter of the two to the longer past."""
        if not self._rows:
            self._rows, self._past, self._mask = [request], list(present), mask
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(a: np.ndarray, axis: int) -> np.ndarray:
            widths = [(0, 0)] * a.ndim
            widths[axis] = (width - a.shape[axis], 0)
            return np.pad(a, widths)
        self._past = [np.concatenate([pad(p, 2), pad(q, 2)]) for p, q in zip(self._past, present)]
        self._mask = np.concatenate([pad(self._mask, 1), pad(mask, 1)])
        self._rows.append(request)

    def _step(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if self._live(r)]
        self._select(keep)
        if not self._rows:
            return
        rows = self._rows
        ids = np.array([[r.tokens[-1]] for r in rows], np.int64)
        mask = np.concatenate([self._mask, np.ones((len(rows), 1), np.int64)], axis=1)
        try:
            logits, present = self.engine(ids, mask, self._past, self.engine.task_ids([r.name for r in rows]))
        except Exception as exc:
            for request in rows:
                self._fail(request, ServeError(500, f"the decoder failed: {exc}", kind="server_error"))
            self._select([])
            return
        self._past, self._mask = list(present), mask
        for i, request in enumerate(rows):
            self._accept(request, sample(logits[i, -1], request.temperature, request.top_p, request.rng))
        self._select([i for i, r in enumerate(rows) if not r.finished])

    def _select(self, keep: list[int]) -> None:
        """Keep these rows of the batch, then cut the columns every remaining row has masked out."""
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._past = [p[keep] for p in self._past]
        self._mask = self._mask[keep]
        used = np.nonzero(self._mask.any(axis=0))[0]
        first = int(used[0]) if used.size else self._mask.shape[1]
        if first:
            self._past = [p[:, :, first:] for p in self._past]
            self._mask = self._mask[:, first:]

    def _accept(self, request: Request, token: int) -> None:
        """Take a row's sampled token: end of sequence, a stop string, the length limit, or more text."""
        if token in self.eos_ids:
            return self._finish(request, "stop", self.decode(request.tokens))
        request.tokens.append(token)
        text = self.decode(request.tokens)
        found = [i for i in (text.find(s) for s in request.stop) if i >= 0]
        if found:
            return self._finish(request, "stop", text[:min(found)])
        total = self.prefix[request.name] + len(request.prompt) + len(request.tokens)
        if len(request.tokens) >= request.max_tokens or total > self.engine.max_length:
            return self._finish(request, "length", text)
        ready = text[:len(text) - _held_back(text, request.stop)]
        if len(ready) > len(request.sent):
            self._emit(request, Delta(ready[len(request.sent):]))
            request.sent = ready

    def _finish(self, request: Request, reason: str, text: str) -> None:
        if len(text) > len(request.sent):
            self._emit(request, Delta(text[len(request.sent):]))
            request.sent = text
        request.finished = True
        self._emit(request, Done(reason, len(request.tokens)))

    def _fail(self, request: Request, error: ServeError) -> None:
        if not request.finished:
            request.finished = True
            self._emit(request, Failed(error))

    def _emit(self, request: Request, event) -> None:
        if request.cancelled:
            return
        try:
            request.emit(event)
        except Exception:           # the server's loop is gone: nobody listens to this request any more
            request.cancelled = True
