"""OpenAI's completion API over a :class:`~peftc.serve.scheduler.Scheduler`, without the web framework: the
request fields read and checked (every mistake a :class:`ServeError` 400 naming the field), prompts and chat
messages turned into token ids, and the responses and server-sent-event chunks in OpenAI's shapes.

A request's prompts (``/v1/completions`` takes a list of them, one choice each) go to the scheduler as
separate rows; their events come back through one asyncio queue (the worker thread puts them with
``call_soon_threadsafe``), and :func:`collect` or :func:`stream` read it until every choice is done."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from peftc.serve.scheduler import Delta, Done, Failed, Request, Scheduler, ServeError

#: parameters that would change what a client gets and that peftc serve does not implement: refused, not ignored
UNSUPPORTED = {"echo": (False,), "suffix": (None, ""), "logprobs": (None, False), "top_logprobs": (None, 0),
               "best_of": (None, 1), "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}
MAX_STOPS = 4                   # as OpenAI's API


def bad(message: str, param: str | None = None) -> ServeError:
    return ServeError(400, message, param=param)


def read_body(raw: bytes) -> dict:
    """The request's JSON object."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad(f"the request body is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise bad(f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise bad("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    """A numeric field in [low, high] (``default`` when absent or null)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}", name)
    if not low <= value <= high:
        raise bad(f"'{name}' is {value}: it must be between {low:g} and {high:g}", name)
    return value


def flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, not {json.dumps(value)}", name)
    return bool(value)


@dataclass
class Params:
    """What every generation request says besides its prompt."""
    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def params(body: dict, max_tokens_field: str = "max_tokens") -> Params:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the name of the base model or of an adapter (GET /v1/models lists them)",
                  "model")
    for name, fine in UNSUPPORTED.items():
        if name in body and body[name] not in fine:
            raise bad(f"'{name}' is not supported by peftc serve", name)
    if number(body, "n", 1, 1, 1 << 31, integer=True) != 1:
        raise bad("'n' must be 1: peftc serve gives one choice per prompt", "n")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
        raise bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    max_tokens = number(body, max_tokens_field, None, 1, 1 << 31, integer=True)
    if max_tokens is None and max_tokens_field != "max_tokens":
        max_tokens = number(body, "max_tokens", None, 1, 1 << 31, integer=True)
    seed = number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    return Params(model, max_tokens, number(body, "temperature", 1.0, 0, 2), number(body, "top_p", 1.0, 0, 1),
                  None if seed is None else seed % (1 << 64), stop, flag(body, "stream"),
                  bool((options or {}).get("include_usage")))


def prompts(body: dict, encode, vocab: int) -> list[list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids or a list of such lists; one row each."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        rows = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        rows = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        rows = prompt
    else:
        raise bad("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                  "prompt")
    out = []
    for row in rows:
        if isinstance(row, str):
            out.append(encode(row))
        elif row and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in row):
            out.append(list(row))
        else:
            raise bad(f"a prompt of token ids must be a non-empty list of integers in [0, {vocab})", "prompt")
    return out


def messages(body: dict) -> list[dict]:
    """``messages`` as the chat template takes them: role and text content (text parts joined)."""
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise bad("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    out = []
    for i, message in enumerate(given):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role' string", "messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: peftc serve takes text parts only", "messages")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": message["role"], "content": content or ""})
    return out


class Generation:
    """One API request's rows in the scheduler, and the queue their events arrive on."""

    def __init__(self, scheduler: Scheduler, name: str, rows: list[list[int]], p: Params, max_tokens: list[int]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.id = f"{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_tokens = sum(map(len, rows))
        for row, limit in zip(rows, max_tokens):
            scheduler.check(name, len(row), limit)
        self.requests = []
        try:
            for i, (row, limit) in enumerate(zip(rows, max_tokens)):
                seed = None if p.seed is None else (p.seed + i) % (1 << 64)
                self.requests.append(Request(name, row, limit, self._emitter(i), p.temperature, p.top_p, seed,
                                             p.stop))
                scheduler.submit(self.requests[-1])
        except ServeError:
            self.cancel()
            raise

    def _emitter(self, index: int):
        def emit(event) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return emit

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def events(self, disconnected=None) -> AsyncIterator[tuple[int, object]]:
        """(choice, event) until every row is done; a :class:`Failed` row raises its error. ``disconnected``
        (an async predicate) is polled while waiting: the rows are cancelled when it says so."""
        left = len(self.requests)
        try:
            while left:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if disconnected is not None and await disconnected():
                        return
                    continue
                if isinstance(event, Failed):
                    raise event.error
                left -= isinstance(event, Done)
                yield index, event
        finally:
            self.cancel()       # a no-op for finished rows; stops the rest when the client went away


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def collect(generation: Generation, model: str, chat: bool, disconnected=None) -> dict:
    """The whole response of a request without ``stream``."""
    n = len(generation.requests)
    texts, reasons, tokens = [""] * n, [None] * n, 0
    async for index, event in generation.events(disconnected):
        if isinstance(event, Delta):
            texts[index] += event.text
        else:
            reasons[index], tokens = event.finish_reason, tokens + event.completion_tokens
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": ("chatcmpl-" if chat else "cmpl-") + generation.id,
            "object": "chat.completion" if chat else "text_completion", "created": generation.created,
            "model": model, "choices": choices, "usage": usage(generation.prompt_tokens, tokens)}


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream(generation: Generation, model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; a row that fails sends
    ``{"error": ...}`` (the status line has gone out already)."""
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + generation.id,
            "object": "chat.completion.chunk" if chat else "text_completion", "created": generation.created,
            "model": model}

    def chunk(index: int, text: str | None, reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return _sse({**head, "choices": [choice]})
    if chat:
        for index in range(len(generation.requests)):
            yield chunk(index, None, role=True)
    tokens = 0
    try:
        async for index, event in generation.events():
            if isinstance(event, Delta):
                yield chunk(index, event.text)
            else:
                tokens += event.completion_tokens
                yield chunk(index, None, event.finish_reason)
    except ServeError as exc:
        yield _sse(exc.body())
    else:
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage(generation.prompt_tokens, tokens)})
    yield "data: [DONE]\n\n"
