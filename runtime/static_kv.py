"""A static (preallocated) KV cache for a transformers decoder: what a CUDA-graphed decode step needs.

:class:`StaticKV` holds a ``transformers.StaticCache`` of ``length`` positions and the step's static input buffers
(token ids, position ids, the padding row of the attention mask, the write slot). The attention mask handed to the
model is an additive 4-D mask ``[batch, 1, new, length]`` built from those buffers: key ``j`` is visible to new token
``i`` when ``j <= past + i`` and the caller's mask has a 1 at ``j``; positions not written yet are hidden. Position ids
are ``past + arange(new)``, as the model computes them itself for a dynamic cache, so both caches give the same
tokens and logits. When a generation outgrows ``length`` the cache is copied into one twice as long
(:meth:`StaticKV.grown`; the graph is re-captured at the new length).

Only models whose cache layers are all full-attention ``StaticLayer`` s are accepted (sliding-window layers need their
own mask): :class:`UnsupportedModel` otherwise, and the engine keeps the dynamic cache.
"""
from __future__ import annotations

import inspect

import torch

MIN_LENGTH = 256        # the first cache length (a power of two >= the prompt + 1 beyond it)


class UnsupportedModel(RuntimeError):
    """This model cannot run on the static cache (the message says why); use the dynamic one."""


def initial_length(total: int, min_length: int | None = None) -> int:
    """The first cache length for a prompt of ``total`` tokens: room for at least one more, doubled from
    ``min_length`` (default :data:`MIN_LENGTH`)."""
    n = max(int(MIN_LENGTH if min_length is None else min_length), 1)
    while n < total + 1:
        n *= 2
    return n


def check_model(model) -> str:
    """Raise :class:`UnsupportedModel` unless ``model`` can decode on a ``StaticCache`` with our 4-D mask; returns
    the keyword the model takes its cache under."""
    from rocket_deploy.hf_compat import cache_kwarg
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager"):
        raise UnsupportedModel(f"attention implementation {impl!r} does not take a 4-D additive mask")
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params:
        raise UnsupportedModel(f"{type(model).__name__}.forward takes no position_ids")
    return cache_kwarg(model)


class StaticKV:
    """One generation slot: the static cache of ``length`` positions for ``batch`` rows and the step buffers."""

    def __init__(self, model, batch: int, length: int, device, dtype: torch.dtype):
        try:
            from transformers import StaticCache
        except ImportError as e:  # pragma: no cover -- every supported transformers has it
            raise UnsupportedModel(f"this transformers has no StaticCache ({e})") from e
        self.cache_arg = check_model(model)
        self._cache_position = "cache_position" in inspect.signature(model.forward).parameters   # transformers 4.x
        try:
            self.cache = StaticCache(config=model.config, max_cache_len=length)
        except Exception as e:  # noqa: BLE001 -- an older / different StaticCache: keep the dynamic cache
            raise UnsupportedModel(f"StaticCache(config, max_cache_len={length}) failed: {e}") from e
        layers = getattr(self.cache, "layers", None)
        if not layers or any(getattr(layer, "is_sliding", False) or type(layer).__name__ != "StaticLayer"
                             for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or ()})
            raise UnsupportedModel(f"its cache layers are {kinds or 'unknown'}, not only full-attention StaticLayer")
        self.model, self.batch, self.length, self.device, self.dtype = model, batch, length, device, dtype
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.pad = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.keys = torch.arange(length, device=device)
        self.neg = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.filled = 0                  # tokens in the cache
        self.logits: torch.Tensor | None = None
        self.graph = self.graph_key = None
        self.warm = False

    # ---- masks -----------------------------------------------------------------------------------------------------
    def mask(self, past: int, new: int) -> torch.Tensor:
        """The additive mask ``[batch, 1, new, length]`` for ``new`` tokens written at ``past ..`` (python ints)."""
        q = past + torch.arange(new, device=self.device)
        visible = (self.keys[None, :] <= q[:, None])[None] & (self.pad[:, None, :] != 0)
        return torch.where(visible, self.zero, self.neg)[:, None]

    def decode_mask(self) -> torch.Tensor:
        """The one-token mask from the static buffers only (``slot`` on the device): what a CUDA graph captures."""
        visible = (self.keys[None, :] <= self.slot) & (self.pad != 0)
        return torch.where(visible, self.zero, self.neg)[:, None, None, :]

    # ---- steps -----------------------------------------------------------------------------------------------------
    def _run(self, ids, mask, pos, cache_position):
        kw = {"cache_position": cache_position} if self._cache_position else {}
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                          **{self.cache_arg: self.cache}, **kw).logits

    def set_mask(self, attention_mask) -> None:
        """Copy the caller's ``[batch, past + new]`` mask into the padding row (the rest stays 0)."""
        m = torch.as_tensor(attention_mask)
        self.pad[:, :m.shape[1]].copy_(m)

    def prefill(self, ids: torch.Tensor, attention_mask) -> torch.Tensor:
        """Write ``ids`` ``[batch, new]`` at ``filled ..`` eagerly (prompt, or a multi-token continuation)."""
        past, new = self.filled, ids.shape[1]
        self.set_mask(attention_mask)
        pos = (past + torch.arange(new, device=self.device))[None].expand(self.batch, new)
        logits = self._run(ids, self.mask(past, new), pos, past + torch.arange(new, device=self.device))
        self.filled += new
        return logits

    def load_decode_inputs(self, ids, attention_mask) -> None:
        """Fill the static buffers for one decode token at ``filled`` (outside the graph)."""
        self.ids.copy_(torch.as_tensor(ids))
        self.pos.fill_(self.filled)
        self.slot.fill_(self.filled)
        self.set_mask(attention_mask)

    def decode_step(self) -> torch.Tensor:
        """The captured step: reads only the static buffers, leaves the logits in ``self.logits``."""
        self.logits = self._run(self.ids, self.decode_mask(), self.pos, self.slot)
        return self.logits

    # ---- growth ----------------------------------------------------------------------------------------------------
    def grown(self, length: int) -> "StaticKV":
        """A copy of this slot with a cache of ``length`` positions (the graph is captured again)."""
        new = StaticKV(self.model, self.batch, length, self.device, self.dtype)
        for old_layer, layer in zip(self.cache.layers, new.cache.layers):
            if not getattr(old_layer, "is_initialized", False):
                continue
            layer.lazy_initialization(old_layer.keys, old_layer.values)
            layer.keys[:, :, :self.length].copy_(old_layer.keys)
            layer.values[:, :, :self.length].copy_(old_layer.values)
            if isinstance(getattr(old_layer, "cumulative_length", None), torch.Tensor):
                layer.cumulative_length.copy_(old_layer.cumulative_length)
        new.pad[:, :self.length].copy_(self.pad)
        new.filled = self.filled
        return new

    def reset(self) -> None:
        """Empty the slot for a new generation (buffers kept)."""
        self.cache.reset()
        self.pad.zero_()
        self.filled = 0
