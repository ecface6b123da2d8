"""``peftc serve``'s web application: OpenAI's ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``
(FastAPI, run by uvicorn) over a :class:`~peftc.serve.scheduler.Scheduler`, and :func:`open_service`, which
loads what a ``peftc export --genai`` directory serves: its decoder as the engine (ONNX Runtime, or the torch
model it was exported from), its tokenizer (the chat template is the tokenizer's), its context length and
end-of-sequence tokens from ``genai_config.json``.

The ``model`` field names an adapter, or the base: under the model name ``peftc.json`` gives, or
``__base__``. Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status (400 for a malformed body or field or a request beyond the context, 404 for an unknown model or
route, 429 when the queue is full), 503 while shutting down, 504 past the request timeout, and a 500 only for
a decoder failure, with a one-line message. FastAPI is imported inside :func:`create_app`: it is the optional
extra ``peftc[serve]`` (and the handlers' annotations are evaluated where it is imported, so this module does
not postpone annotations)."""
import asyncio
import contextlib
import time
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

from peftc.compiler.compiled import compile as compile_model
from peftc.errors import PeftcError, read_json
from peftc.export.genai import MODEL_FILE, ORIGIN_FILE, OnnxStep, TorchStep, exported_model
from peftc.export.kvcache import cache_decoder
from peftc.rundir import read_manifest
from peftc.serve import api
from peftc.serve.bank import AdapterBank
from peftc.serve.bank_onnx import KIND as BANK_KIND, OnnxEngine
from peftc.serve.engine import BASE, BaseEngine, Engine
from peftc.serve.scheduler import Scheduler, ServeError
from peftc.training.data import Codec, load_codec

#: a chat request without max_tokens may use the rest of the context (as OpenAI's); a completion gets 16
COMPLETION_MAX_TOKENS = 16


@dataclass
class Service:
    """What the application serves: the scheduler over the engine, the tokenizer, the base's listed name."""
    scheduler: Scheduler
    codec: Codec
    base: str
    vocab: int
    adapters: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))

    def names(self) -> list[str]:
        return [self.base, *self.adapters]

    def engine_name(self, model: str) -> str:
        if model in (self.base, BASE):
            return BASE
        if model in self.adapters:
            return model
        raise ServeError(404, f"The model '{model}' does not exist: this server has {', '.join(self.names())}",
                         param="model", code="model_not_found")


def _served_dir(out: Path) -> tuple[dict, dict]:
    """(genai_config.json's model section, peftc.json) of a ``--genai`` export or an adapter bank's directory
    (which has no genai_config.json)."""
    origin = read_json(out / ORIGIN_FILE) if (out / ORIGIN_FILE).is_file() else {}
    origin = origin if isinstance(origin, dict) else {}
    if out.is_dir() and (out / MODEL_FILE).is_file() and origin.get("kind") == BANK_KIND:
        return {}, origin
    if not out.is_dir() or not (out / "genai_config.json").is_file() or not (out / MODEL_FILE).is_file():
        raise PeftcError(f"'{out}' is not a 'peftc export --genai' directory (no genai_config.json and {MODEL_FILE})")
    config = read_json(out / "genai_config.json").get("model")
    if not isinstance(config, dict) or not isinstance(config.get("context_length"), int):
        raise PeftcError(f"{out / 'genai_config.json'}: no model.context_length")
    return config, origin


def _codec(out: Path, model_ref: str | None) -> Codec:
    """The tokenizer in ``out`` (as the export copied it), else the one of the model it names."""
    if any((out / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer
        try:
            return Codec(AutoTokenizer.from_pretrained(str(out)))
        except Exception as exc:
            raise PeftcError(f"cannot load the tokenizer in {out}: {exc}") from exc
    if model_ref is None:
        raise PeftcError(f"{out} has no tokenizer files and no {ORIGIN_FILE} naming its model")
    return load_codec(model_ref)


def base_engine(out: Path, config: dict, use_torch: bool, model_ref: str | None) -> Engine:
    """The engine without adapters: ``out``'s model.onnx in ONNX Runtime, or (``use_torch``) the torch
    KV-cache decoder of the model ``peftc.json`` names, compiled without an adapter."""
    if not use_torch:
        return BaseEngine(OnnxStep(out / MODEL_FILE), config["context_length"])
    if model_ref is None:
        raise PeftcError(f"--torch compiles the model {out / ORIGIN_FILE} names, and there is none")
    decoder = cache_decoder(compile_model(model_ref, "").merge())
    return BaseEngine(TorchStep(decoder), decoder.layout.max_length)


def bank_engine(out: str | Path, adapters: dict[str, str | Path], *, use_torch: bool, workdir: Path) -> Engine:
    """The adapter bank of ``adapters`` ({name: run directory}) on the model ``out`` was exported from: its
    torch engine, or its ONNX decoder written (and verified) under ``workdir`` and run in ONNX Runtime."""
    out = Path(out)
    model_ref = exported_model(out)
    if model_ref is None:
        raise PeftcError(f"{out} has no {ORIGIN_FILE} naming its model: the adapters need the base they were made on")
    for name, directory in adapters.items():
        _, _, ref = read_manifest(Namespace(dir=directory, model=None))
        if ref != model_ref:
            raise PeftcError(f"{directory}: the adapter '{name}' was made on {ref}, and {out} serves {model_ref}")
    bank = AdapterBank.load(model_ref, adapters)
    if use_torch:
        return bank.torch_engine()
    bank.export_onnx(Path(workdir) / "bank")
    return OnnxEngine(Path(workdir) / "bank")


def _vocab(config: dict, engine) -> int:
    """The model's vocabulary (what a prompt of token ids may use): genai_config.json's, else the logits'."""
    if isinstance(config.get("vocab_size"), int):
        return config["vocab_size"]
    session = getattr(getattr(engine, "step", None), "session", None)
    dim = session.get_outputs()[0].shape[-1] if session is not None else None
    if isinstance(dim, int):
        return dim
    return getattr(getattr(getattr(engine, "decoder", None), "config", None), "vocab_size", None) or 1 << 31


def open_service(out: str | Path, engine: Engine | None = None, *, use_torch: bool = False, max_batch: int = 8,
                 queue: int = 64, timeout: float = 300.0) -> Service:
    """Load what ``out`` serves: a ``--genai`` export (the base alone unless ``engine``, an adapter bank's
    engine, replaces it) or an adapter bank's ONNX directory (every adapter in it)."""
    out = Path(out)
    config, origin = _served_dir(out)
    model_ref = origin.get("model") if isinstance(origin.get("model"), str) else None
    codec = _codec(out, model_ref)
    if engine is None and not config:
        if use_torch:
            raise PeftcError(f"{out} is an adapter bank's ONNX directory; for torch give the base's --genai "
                             "directory and each --adapter")
        engine = OnnxEngine(out)
    engine = engine if engine is not None else base_engine(out, config, use_torch, model_ref)
    eos = config.get("eos_token_id")
    eos = {codec.eos_id, *(eos if isinstance(eos, list) else [] if eos is None else [eos])}
    scheduler = Scheduler(engine, codec.decode, eos, max_batch=max_batch, queue=queue, timeout=timeout)
    return Service(scheduler, codec, model_ref or BASE, _vocab(config, engine), [n for n in engine.names if n != BASE])


def _chat_ids(service: Service, conversation: list[dict]) -> list[int]:
    tokenizer = service.codec.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:        # the template's own checks (raise_exception) and Jinja's errors
        raise ServeError(400, f"the chat template refused the messages: {exc}", param="messages") from None
    return service.codec.encode_completion(text)


def _generation(service: Service, body: dict, chat: bool) -> tuple[api.Generation, api.Params]:
    p = api.params(body, "max_completion_tokens" if chat else "max_tokens")
    name = service.engine_name(p.model)
    if chat:
        rows = [_chat_ids(service, api.messages(body))]
    else:
        rows = api.prompts(body, lambda text: service.codec.encode_prompt(text), service.vocab)
    scheduler = service.scheduler
    limits = [p.max_tokens if p.max_tokens is not None else
              max(1, scheduler.room(name, len(row))) if chat else COMPLETION_MAX_TOKENS for row in rows]
    return api.Generation(scheduler, name, rows, p, limits), p


def create_app(service: Service):
    """The FastAPI application; its lifespan starts the scheduler's worker and, at shutdown, cancels what is
    still running (uvicorn has let running requests finish first, up to its graceful timeout)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.scheduler.close, True)

    app = FastAPI(title="peftc serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    _error_handlers(app)

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": service.created, "owned_by": "peftc"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(name) for name in service.names()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        service.engine_name(model)
        return card(model)

    async def generate(request: Request, chat: bool):
        generation, p = _generation(service, api.read_body(await request.body()), chat)
        if p.stream:
            return StreamingResponse(api.stream(generation, p.model, chat, p.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await api.collect(generation, p.model, chat, request.is_disconnected)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


def _error_handlers(app) -> None:
    """Every error as OpenAI's JSON: peftc's own, starlette's (unknown route, wrong method), and any other
    exception as a one-line 500."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error(exc: ServeError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ServeError)
    async def serve_error(_request, exc: ServeError):
        return error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error(ServeError(exc.status_code, str(exc.detail), kind, code=str(exc.status_code)))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return error(api.bad(f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        message = str(exc).splitlines()[0] if str(exc) else ""
        return error(ServeError(500, f"internal error: {type(exc).__name__}: {message}", "server_error"))
