"""Text generation for one request: tokens -> text deltas, stop strings (synchronous; runs on the engine thread).

Detokenisation is incremental (:class:`IncrementalDetokenizer`): each token decodes a window of a few tokens,
never the whole sequence, so a long generation costs O(1) tokenizer work per token. The window starts at the
last point where the text was final, which keeps what a token-by-token decode gets wrong: the space a
SentencePiece ``▁`` or a byte-level ``Ġ`` token carries only in context, and UTF-8 characters split over several
byte tokens (held back while the window's text ends in an incomplete character, ``\\ufffd``).
"""
from __future__ import annotations

import logging
from typing import Any

from ..engine import Engine, SamplingParams

log = logging.getLogger("rocket_deploy.server")


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the text each one makes final."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._start = 0            # the window's first token: context for the next decode
        self._read = 0             # tokens [_start, _read) are already released
        self._start_text = ""      # decode(ids[_start:_read])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.decode(self.ids[self._start:])
        if len(text) <= len(self._start_text) or text.endswith("\ufffd") or not text.startswith(self._start_text):
            return ""              # nothing new yet, or an incomplete character: wait for the next token
        delta = text[len(self._start_text):]
        self._start, self._read = self._read, len(self.ids)
        self._start_text = self.decode(self.ids[self._start:self._read])
        return delta

    def rest(self) -> str:
        """What the window holds beyond the released text (at the end: an incomplete character, as decoded)."""
        text = self.decode(self.ids[self._start:])
        return text[len(self._start_text):] if text.startswith(self._start_text) else ""


class TextGeneration:
    """Drives :meth:`Engine.stream_tokens` one token per :meth:`step` and turns tokens into text deltas.

    Text is released only when it is final: an incomplete UTF-8 character and a trailing piece that could be the
    start of a stop string are held back until the next token decides them, so the concatenated deltas equal the
    non-streamed text. A stop string ends generation and is cut from the text."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, stop: tuple[str, ...] = ()):
        self._tok = engine.tokenizer
        self._detok = IncrementalDetokenizer(self._tok) if self._tok is not None else None
        self._stats: dict = {}
        self._gen = engine.stream_tokens(prompt_ids, params, self._stats)
        self.stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self._pending = ""              # decoded text not released yet (it may begin a stop string)
        self.token_ids: list[int] = []
        self.text = ""                  # released text so far
        self.done = False
        self.finish_reason: str | None = None

    def step(self) -> str:
        """Generate one token; return the newly released text (maybe empty). Sets ``done`` at the end."""
        if self.done:
            return ""
        try:
            tok = int(next(self._gen))
        except StopIteration:
            return self._finish(self._stats.get("finish_reason", "length"))
        self.token_ids.append(tok)
        if self._detok is None:
            return ""
        self._pending += self._detok.push(tok)
        if self.stop:
            hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.close()
                return self._finish("stop", self._pending[:min(hits)])
        hold = 0                        # the longest tail that is a proper prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self._pending) - hold
        delta, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += delta
        return delta

    def _finish(self, reason: str, tail: str | None = None) -> str:
        if tail is None:
            tail = self._pending + (self._detok.rest() if self._detok is not None else "")
            if self._detok is not None:     # one full decode at the end: exactly what a non-streaming decode says
                full = self._detok.decode(self.token_ids)
                if full.startswith(self.text):
                    tail = full[len(self.text):]
                else:
                    log.debug("incremental and full decode disagree; keeping the streamed text")
        self.text += tail
        self.done, self.finish_reason = True, reason
        return tail

    def close(self) -> None:
        """Stop generating (frees the KV state). Call on the worker thread, or when no step is running."""
        self._gen.close()
