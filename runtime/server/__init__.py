"""An OpenAI-compatible HTTP server over any :class:`~rocket_deploy.runtime.engine.Engine` (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE streaming), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus). docs/serving.md describes the API, limits and faults.

=================  ==============================================================================================
module             job
=================  ==============================================================================================
``settings``       :class:`ServerSettings`: limits, timeouts, the API key (checked on construction)
``protocol``       the wire format: pydantic request / response models, OpenAI-shaped errors (:class:`APIError`)
``body``           reading a JSON body: content type, size, read deadline, nesting depth
``generation``     :class:`TextGeneration`: incremental detokenisation and stop strings (engine thread)
``admission``      slots and the FIFO queue (429 / 503)
``service``        the engine worker thread, prompt checks, jobs, lifelines, draining
``metrics``        Prometheus metrics (``prometheus_client``) and their middleware
``middleware``     ``x-request-id`` and the API key
``app``            the FastAPI app: routes, SSE (``sse-starlette``), disconnect handling
``connection``     uvicorn's h11 protocol with a header read timeout
``process``        the uvicorn server: signals, draining, :func:`serve`
=================  ==============================================================================================
"""
from .app import create_app
from .generation import IncrementalDetokenizer, TextGeneration
from .process import DrainingServer, exposure_warning, make_server, serve
from .protocol import APIError, GenRequest, parse_request
from .settings import ServerSettings

__all__ = ["APIError", "DrainingServer", "GenRequest", "IncrementalDetokenizer", "ServerSettings", "TextGeneration",
           "create_app", "exposure_warning", "make_server", "parse_request", "serve"]
