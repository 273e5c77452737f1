"""Run the server: load the model behind an engine and serve the app with uvicorn.

The port opens at once and ``/health`` says "loading" until the model and the engine
are ready (a big checkpoint takes a while to read). SIGINT and SIGTERM shut down
gracefully: uvicorn stops accepting connections, gives running requests up to
``shutdown_timeout`` seconds to finish, then the engine stops (requests still queued end
"cancelled") and the process exits with status 0.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from molmoe_lite.errors import MolmoeLiteError, UsageError

log = logging.getLogger("molmoe_lite.serve")


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_context: int | None = None
    max_queue: int = 64
    api_key: str | None = None
    device: str | None = None
    dtype: str | None = None
    preset: str = "default"
    quantize: str | None = None
    threads: int | None = None
    allow_files: str | None = None
    max_body_mb: float = 20.0
    model_name: str | None = None
    default_max_tokens: int = 200
    shutdown_timeout: float = 10.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _served_name(options: ServeOptions) -> str:
    if options.model_name:
        return options.model_name
    path = Path(options.model)
    return path.resolve().name if path.exists() else options.model  # a folder's name, or the hub id


def build(options: ServeOptions):
    """(ASGI app, state) for ``options``, after checking them (no model loaded yet)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("serving needs the 'serve' extra: pip install 'molmoe-lite[serve]'") from None
    from molmoe_lite.serve.app import Loaded, ServeConfig, create_app
    from molmoe_lite.serve.image_urls import ImageLimits

    if options.max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {options.max_batch}")
    if options.max_queue < 1:
        raise UsageError(f"--max-queue must be at least 1, got {options.max_queue}")
    if options.max_context is not None and options.max_context < 2:
        raise UsageError(f"--max-context must be at least 2, got {options.max_context}")
    if options.max_body_mb <= 0:
        raise UsageError(f"--max-body-mb must be positive, got {options.max_body_mb}")
    allow = None
    if options.allow_files is not None:
        allow = Path(options.allow_files).resolve()
        if not allow.is_dir():
            raise UsageError(f"--allow-files {options.allow_files}: not a folder")
    if options.api_key is not None and not options.api_key.strip():
        raise UsageError("--api-key is empty")
    from molmoe_lite.hub import resolve_model

    folder = resolve_model(options.model)  # a missing folder fails here, before the port opens

    def loader() -> Loaded:
        from molmoe_lite.api import load
        from molmoe_lite.engine import Engine

        model = load(folder, device=options.device, dtype=options.dtype, quantize=options.quantize,
                     preset=options.preset, threads=options.threads)
        context = options.max_context or model.config.max_sequence_length
        engine = Engine(model, max_batch=options.max_batch, max_context=context, max_queue=options.max_queue)
        engine.start()
        return Loaded(model=model, engine=engine, max_context=context)

    config = ServeConfig(
        model_name=_served_name(options),
        api_key=options.api_key,
        max_body_bytes=int(options.max_body_mb * 2**20),
        image_limits=ImageLimits(allow_files=allow),
        default_max_tokens=options.default_max_tokens,
    )
    return create_app(config, loader)


def serve(options: ServeOptions) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a graceful shutdown. Load errors are raised."""
    app, state = build(options)
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a caught signal after shutting down (so the process dies of it);
            # a graceful shutdown is the whole answer to SIGINT/SIGTERM here: exit with 0
            getattr(self, "_captured_signals", []).clear()

    if not is_loopback(options.host) and options.api_key is None:
        print(f"warning: serving on {options.host} without --api-key: anyone who can reach this port "
              "can use the model", file=sys.stderr)
    server = Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                                   timeout_graceful_shutdown=options.shutdown_timeout, lifespan="on"))

    def stop_on_load_error(exc: BaseException) -> None:
        server.should_exit = True

    state.on_load_error = stop_on_load_error
    url_host = f"[{options.host}]" if ":" in options.host else options.host
    print(f"molmoe-lite serve: {state.config.model_name} on http://{url_host}:{options.port} "
          "(the page at /, the API at /v1; loading the model...)", file=sys.stderr)
    server.run()
    if state.load_error is not None:
        if isinstance(state.load_error, (MolmoeLiteError, OSError)):
            raise state.load_error
        raise RuntimeError(f"loading the model failed: {state.load_error!r}") from state.load_error
    return 0
