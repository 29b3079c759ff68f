"""Running the app: a uvicorn server whose SIGINT/SIGTERM starts a drain before uvicorn's own shutdown.

On the first signal ``/health`` turns ``503 draining`` and new generation requests are answered 503, while the
listening socket stays open; in-flight requests (streams included) get ``shutdown_timeout_s`` to finish, then
what is left is aborted (503 JSON, or a stream's final error event and ``[DONE]``), and only then is uvicorn told
to exit (``should_exit``): it closes the sockets and returns. The process exits with status 0. A second signal
stops at once, waiting for nothing.

Only uvicorn's public surface is used: ``Config``, ``Server.handle_exit`` (the signal handler uvicorn installs),
``should_exit`` / ``force_exit``.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging

import uvicorn

from ..engine import Engine
from .app import create_app
from .connection import with_header_timeout
from .service import DRAIN_GRACE_S, GenerationService
from .settings import ServerSettings

log = logging.getLogger("rocket_deploy.server")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when ``host`` is reachable from other machines and no API key guards it."""
    if api_key:
        return None
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass                            # a host name: it may resolve to anything
    return (f"serving on {host} without an API key: anyone who can reach this address can use the model; "
            f"pass --api-key (or set ROCKET_API_KEY), or bind 127.0.0.1")


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose signal handler drains the :class:`GenerationService` before stopping."""

    def __init__(self, config, service: GenerationService, shutdown_timeout_s: float):
        super().__init__(config)
        self.service, self.shutdown_timeout_s = service, shutdown_timeout_s
        self.draining = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:
        """The SIGINT/SIGTERM handler (also callable from another thread)."""
        if self.draining:               # a second signal: stop now, without waiting for anything
            self.force_exit = self.should_exit = True
            return
        self.draining = True
        self.service.admission.draining = True          # /health answers 503 from now on
        loop = self.service.loop
        if loop is None or loop.is_closed():            # not serving yet (or any more)
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.service.drain(self.shutdown_timeout_s)
        finally:
            self.should_exit = True


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
                log_level: str = "info") -> DrainingServer:
    """A configured :class:`DrainingServer` (not started); ``server.app`` is the FastAPI app."""
    settings = settings or ServerSettings()
    warning = exposure_warning(host, settings.api_key)
    if warning:
        log.warning(warning)
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            http=with_header_timeout(settings.header_timeout_s), ws="none", lifespan="on",
                            timeout_keep_alive=5,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s + DRAIN_GRACE_S)
    server = DrainingServer(config, app.state.rocket, settings.shutdown_timeout_s)
    server.app = app
    return server


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          log_level: str = "info") -> None:
    """Serve ``engine`` over HTTP until SIGINT/SIGTERM (blocking); returns after the graceful shutdown."""
    make_server(engine, host, port, settings, log_level).run()
    log.info("server stopped")
