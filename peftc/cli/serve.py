"""``peftc serve OUT/``: the OpenAI-compatible server (:mod:`peftc.serve.server`) on uvicorn, over the
``peftc export --genai`` directory OUT, with continuous batching. SIGTERM and Ctrl-C stop it taking
connections, let running requests finish (up to ``--timeout``), cancel what is left, and exit 0."""
from __future__ import annotations

import contextlib
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from peftc.cli.progress import step
from peftc.errors import PeftcError
from peftc.export.genai import exported_model
from peftc.serve.engine import BASE
from peftc.serve.server import bank_engine, create_app, open_service


def uvicorn_server(app, grace: float):
    """A uvicorn server whose signal handling ends in a normal return: uvicorn's own re-raises the signal
    after its graceful shutdown, which makes the process die of SIGTERM (status 143) instead of exiting 0."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            before = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace, access_log=False)
    return Server(config)


def adapters_of(values: list[str], base: str | None) -> dict[str, str]:
    """``--adapter NAME=DIR`` values as {name: directory}; a name is given once and is not the base's."""
    adapters = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise PeftcError(f"--adapter {value}: expected NAME=DIR (a run directory of 'peftc compile' or 'peftc train')")
        if name in adapters or name in (BASE, base):
            taken = "given twice" if name in adapters else "taken by the base model"
            raise PeftcError(f"--adapter {value}: the name '{name}' is {taken}")
        adapters[name] = directory
    return adapters


def cmd_serve(args) -> int:
    if args.max_batch < 1 or args.queue < 1 or args.timeout <= 0:
        raise PeftcError("--max-batch and --queue must be at least 1, and --timeout positive")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PeftcError("peftc serve needs FastAPI and uvicorn: pip install 'peftc[serve]'") from None
    adapters = adapters_of(args.adapter, exported_model(args.out))
    listener = listen(args.host, args.port)
    with listener, tempfile.TemporaryDirectory(prefix="peftc-serve-") as workdir:
        engine = None
        if adapters:
            with step(f"loading {len(adapters)} adapters into one bank"
                      f"{'' if args.torch else ' and verifying its ONNX decoder'}"):
                engine = bank_engine(args.out, adapters, use_torch=args.torch, workdir=Path(workdir))
        service = open_service(args.out, engine, use_torch=args.torch, max_batch=args.max_batch, queue=args.queue,
                               timeout=args.timeout)
        server = uvicorn_server(create_app(service), args.timeout)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {', '.join(service.names())} from {args.out} at http://{host}:{listener.getsockname()[1]}/v1 "
              f"({'torch' if args.torch else 'onnxruntime'}, batch {args.max_batch}, queue {args.queue}); "
              "Ctrl-C stops", flush=True)
        try:
            server.run(sockets=[listener])
        except SystemExit as exc:               # uvicorn exits when the application fails to start
            raise PeftcError(f"the server failed to start (uvicorn exit status {exc.code})") from None
    print("peftc serve: stopped", file=sys.stderr, flush=True)
    return 0


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port is one line, not uvicorn's exit."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise PeftcError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a --genai export (and adapters) with OpenAI's API, continuous batching",
                       description="An OpenAI-compatible server (GET /v1/models, POST /v1/completions and "
                                   "/v1/chat/completions, streaming) over a 'peftc export --genai' directory; "
                                   "the request's 'model' names an adapter or the base.")
    p.add_argument("out", help="a directory written by 'peftc export RUN --genai OUT'")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="also serve the adapter in run directory DIR as model NAME (repeat for several)")
    p.add_argument("--torch", action="store_true", help="run the torch model instead of ONNX Runtime")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together at most (default 8)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests that may wait for a place in the batch; more get 429 (default 64)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a request may take, queued and running, before it fails with 504 (default 300)")
    p.set_defaults(func=cmd_serve)
