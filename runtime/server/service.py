"""The generation service: one engine worker thread, admission, prompt checks, and the jobs that hold a slot.

Engines are synchronous and not thread-safe, so every engine and tokenizer call runs on ONE worker thread (a
single-thread executor); the event loop never blocks on the model. In-flight requests advance one token per
worker task, so they interleave token by token (each keeps its own KV state in the engine's opaque
``present``/``past``, as the :meth:`Engine.forward` contract requires).

Every generation request holds a :class:`Lifeline` while the server works on it; a shutdown that runs past its
timeout aborts the lifelines that are left (each request then answers 503, or a stream its final error event).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from typing import Callable

from ..engine import Engine, SamplingParams
from .admission import Admission
from .generation import TextGeneration
from .metrics import Metrics
from .protocol import APIError, GenRequest, Usage, bad_request
from .settings import ServerSettings

log = logging.getLogger("rocket_deploy.server")

DRAIN_GRACE_S = 5.0         # after aborting what outlived the shutdown timeout: time to send those answers


class Lifeline:
    """One generation request while the server works on it; :meth:`abort` ends it with an error."""

    def __init__(self, service: "GenerationService"):
        self._service = service
        self.aborted: asyncio.Future = asyncio.get_running_loop().create_future()
        service.active.add(self)

    def abort(self, err: APIError) -> None:
        if not self.aborted.done():
            self.aborted.set_result(err)

    @property
    def error(self) -> APIError | None:
        return self.aborted.result() if self.aborted.done() else None

    def close(self) -> None:
        self._service.active.discard(self)


class Job:
    """One admitted generation request: owns a slot until :meth:`release` (idempotent, synchronous)."""

    def __init__(self, service: "GenerationService", gen: TextGeneration, prompt_tokens: int, deadline: float,
                 admitted_at: float, lifeline: Lifeline):
        self.service, self.gen, self.prompt_tokens, self.deadline = service, gen, prompt_tokens, deadline
        self.admitted_at, self.lifeline = admitted_at, lifeline
        self.released = False
        self.first_token = False
        self.pending = ""           # text released by the first step (run before the response starts)

    def _timeout(self) -> APIError:
        return APIError(504, f"the request took longer than {self.service.settings.request_timeout_s:g}s "
                             f"(request_timeout_s)", "server_error", code="timeout")

    async def step(self) -> str:
        """One token on the worker thread. Past the deadline it raises 504 (checked between tokens: a running
        step holds the worker, so it keeps the slot); when the lifeline is aborted it raises the abort's error
        at once (the step still running finishes on the worker, unobserved)."""
        if self.lifeline.error is not None:
            raise self.lifeline.error
        if time.monotonic() > self.deadline:
            raise self._timeout()
        fut = self.service.submit(self.gen.step)
        try:
            await asyncio.wait({fut, self.lifeline.aborted}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            fut.cancel()
            raise
        if not fut.done():
            fut.cancel()
            raise self.lifeline.error
        delta = fut.result()
        if not self.first_token and self.gen.token_ids:
            self.first_token = True
            self.service.metrics.ttft.observe(time.monotonic() - self.admitted_at)
        return delta

    def usage(self) -> Usage:
        c = len(self.gen.token_ids)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=c, total_tokens=self.prompt_tokens + c)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if not self.gen.done:
            self.service.submit_quietly(self.gen.close)   # after any step still running on the worker
        self.service.metrics.add_tokens(completion=len(self.gen.token_ids))
        self.service.admission.release()


class GenerationService:
    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.metrics = Metrics(in_flight=lambda: self.admission.in_flight, waiting=lambda: self.admission.waiting)
        self.admission = Admission(settings, self.metrics.reject)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rocket-engine")
        self.created = int(time.time())
        self.max_context = getattr(engine, "max_context", None)
        tok = engine.tokenizer
        self.vocab_size = len(tok) if tok is not None else None
        self.active: set[Lifeline] = set()
        self.loop: asyncio.AbstractEventLoop | None = None     # the serving loop (set by the app's lifespan)

    # ---- the worker thread ----------------------------------------------------------------------------------
    def submit(self, fn: Callable, *args) -> asyncio.Future:
        try:
            return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except RuntimeError as e:           # the executor is shut down
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down") from e

    async def call(self, fn: Callable, *args):
        return await self.submit(fn, *args)

    def submit_quietly(self, fn: Callable) -> None:
        try:
            self.executor.submit(fn)
        except RuntimeError:        # executor already shut down: the worker is gone, closing is safe here
            with contextlib.suppress(Exception):
                fn()

    def close(self) -> None:
        self.admission.draining = True
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- a request ------------------------------------------------------------------------------------------
    async def start(self, req: GenRequest, t_arrival: float, lifeline: Lifeline) -> Job:
        """Admit, tokenize, check limits, prefill and generate the first token (so that errors in any of these
        are answered with a status code, also for streams)."""
        deadline = t_arrival + self.settings.request_timeout_s
        await self.admission.acquire(deadline)
        admitted_at = time.monotonic()
        job = None
        try:
            ids = await self._prompt_ids(req)
            n = len(ids)
            if n == 0:
                raise bad_request("the prompt is empty after tokenization", "prompt", "empty_prompt")
            if n > self.settings.max_prompt_tokens:
                raise bad_request(f"the prompt is {n} tokens, longer than this server's limit of "
                                  f"{self.settings.max_prompt_tokens} (--max-prompt-tokens)", req.prompt_param,
                                  "context_length_exceeded")
            max_tokens = req.max_tokens if req.max_tokens is not None else self.settings.max_new_tokens
            if self.max_context:
                ctx = int(self.max_context)
                if n >= ctx:
                    raise bad_request(f"the prompt is {n} tokens; the model's context is {ctx} tokens, so no token "
                                      f"can follow it: shorten the prompt", req.prompt_param,
                                      "context_length_exceeded")
                if req.max_tokens is None:
                    max_tokens = min(max_tokens, ctx - n)
                if n + max_tokens > ctx:
                    raise bad_request(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                                      f"of {ctx} tokens; ask for at most {ctx - n}", "max_tokens",
                                      "context_length_exceeded")
            params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    top_k=req.top_k, seed=req.seed)
            gen = TextGeneration(self.engine, ids, params, req.stop)
            job = Job(self, gen, n, deadline, admitted_at, lifeline)
            self.metrics.add_tokens(prompt=n)
            try:
                job.pending = await job.step()      # prefill + first token
            except ValueError as e:                 # the engine refused the input (e.g. a context limit)
                raise bad_request(f"the model refused the request: {e}", "prompt", "invalid_prompt")
            return job
        except BaseException:
            if job is not None:
                job.release()
            else:
                self.admission.release()
            raise

    async def _prompt_ids(self, req: GenRequest) -> list[int]:
        if req.prompt_ids is not None:
            if self.vocab_size is not None:
                bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                                      "prompt", "invalid_value")
            elif any(t < 0 for t in req.prompt_ids):
                raise bad_request("token ids must be >= 0", "prompt", "invalid_value")
            return list(req.prompt_ids)
        if self.engine.tokenizer is None:
            raise bad_request("this model has no tokenizer: send 'prompt' as an array of token ids",
                              req.prompt_param, "no_tokenizer")
        try:
            if req.kind == "chat":
                return await self.call(lambda: self.engine.encode_prompt(messages=req.messages))
            return await self.call(lambda: self.engine.encode_prompt(req.prompt))
        except APIError:
            raise
        except Exception as e:      # e.g. no chat template, or the template rejects the roles / their order
            raise bad_request(f"could not build the prompt: {e}", req.prompt_param, "invalid_prompt")

    # ---- shutdown -------------------------------------------------------------------------------------------
    async def _idle(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while self.active and time.monotonic() < end:
            await asyncio.sleep(0.02)
        return not self.active

    async def drain(self, timeout: float, grace: float = DRAIN_GRACE_S) -> None:
        """Refuse new requests (503), let the running ones finish for ``timeout`` seconds, then abort the rest
        (503 JSON; a stream ends with an error event and ``[DONE]``) and give their answers ``grace`` seconds."""
        self.admission.draining = True
        if await self._idle(timeout):
            return
        log.warning("shutdown timeout (%gs) reached with %d request(s) still running: answering them 503",
                    timeout, len(self.active))
        err = APIError(503, f"the server is shutting down: the request did not finish within the shutdown "
                            f"timeout ({timeout:g}s)", "server_error", code="shutting_down",
                       headers=self.admission.retry_headers())
        for lifeline in list(self.active):
            lifeline.abort(err)
        await self._idle(grace)
