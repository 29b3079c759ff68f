"""Reading a request body: JSON only, at most ``max_body_bytes``, within ``body_timeout_s``, nested at most
:data:`MAX_JSON_DEPTH` deep (a deeper document is refused with 400 before anything recurses into it)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from .protocol import APIError, bad_request
from .settings import ServerSettings

MAX_JSON_DEPTH = 32         # OpenAI requests nest 4-5 deep; deeper documents are refused


def _too_deep(doc: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Is ``doc`` nested deeper than ``limit``? (iterative: no recursion, whatever the depth)"""
    stack = [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        if d > limit:
            return True
        stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return False


def body_timeout(settings: ServerSettings) -> APIError:
    return APIError(408, f"the request body did not arrive within {settings.body_timeout_s:g}s "
                         f"(--body-timeout)", code="request_timeout", headers={"Connection": "close"})


async def read_json(request, settings: ServerSettings) -> Any:
    """The decoded JSON body of ``request`` (a Starlette request), or an :class:`APIError` (400/408/413/415)."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        mime = ctype.split(";", 1)[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise APIError(415, f"unsupported content type '{mime}'; send JSON with 'Content-Type: "
                                f"application/json'", code="unsupported_media_type")
    limit = settings.max_body_bytes
    clen = request.headers.get("content-length")
    declared = None
    if clen is not None:
        try:
            declared = int(clen)
        except ValueError:
            raise bad_request("invalid Content-Length header")
    chunks, size = [], 0
    drain_cap = max(4 * limit, 8 << 20)   # read (and drop) an oversized body up to this, so the client sees the 413

    async def receive_all():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit and (declared is None or declared <= limit):
                chunks.append(chunk)
            elif size > drain_cap:
                break

    try:
        await asyncio.wait_for(receive_all(), settings.body_timeout_s)
    except asyncio.TimeoutError:
        raise body_timeout(settings) from None
    if size > limit or (declared is not None and declared > limit):
        raise APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                            f"(--max-body-bytes)", code="request_too_large")
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", None, "invalid_json")
    too_deep = bad_request(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
    try:
        doc = json.loads(raw)
    except RecursionError:              # deeper than the interpreter's recursion limit
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json")
    if _too_deep(doc):
        raise too_deep
    return doc
