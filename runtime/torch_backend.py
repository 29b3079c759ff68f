"""Torch backend: runs a transformers model (dense, or a loaded ROCKET artifact) behind :class:`Engine`.

Two KV caches (docs/serving.md, "CUDA graphs"):

* dynamic (transformers' default cache, grown by concatenation): every step runs eagerly;
* static (:mod:`.static_kv`: preallocated buffers, doubled when a generation outgrows them): on CUDA each decode
  step is captured once into a CUDA graph and replayed per token (:mod:`.cuda_graphs`), because batch-1 decode is
  bound by kernel launches, not bandwidth, when it runs eagerly.

``cuda_graphs`` (default: on when the engine runs on CUDA) switches the graphs; ``static_kv`` (default: the same as
``cuda_graphs``) the static cache, which also runs on the CPU (eagerly, for tests). Models the static cache does not
fit (sliding-window layers, attention that takes no 4-D mask, ...) keep the dynamic cache, logged once; so do
prompts with padding in their attention mask.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from rocket_deploy.hf_compat import cache_kwarg

from . import kernels
from .cuda_graphs import SlotPool, StepGraphs, TorchGraphs
from .engine import Engine, context_from_config

log = logging.getLogger("rocket_deploy.runtime.torch_backend")
MAX_STATIC_SLOTS = 4      # generations at once on static caches; more use the dynamic cache


@dataclasses.dataclass(eq=False)
class StaticKVState:
    """The ``present`` of the static-cache path: the slot holding this generation's cache (see :mod:`.static_kv`)."""
    slot: Any

    @property
    def length(self) -> int:
        return self.slot.filled


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model: torch.nn.Module, tokenizer=None, device: str | None = None, *,
                 cuda_graphs: bool | None = None, static_kv: bool | None = None,
                 max_static_slots: int = MAX_STATIC_SLOTS):
        kernels.enable()      # RocketLinear layers use the compiled sparse-V kernels on CUDA when available
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.is_decoder = bool(getattr(model.config, "is_decoder", False)) or hasattr(model, "lm_head") \
            or "ForCausalLM" in type(model).__name__
        self._cache_arg = cache_kwarg(model)   # ``cache`` (transformers 5.x) or ``past_key_values`` (4.x)
        self.max_context = context_from_config(model.config) if self.is_decoder else None
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda and (True if cuda_graphs is None else bool(cuda_graphs))
        self.static_kv = self.is_decoder and (self.cuda_graphs if static_kv is None else bool(static_kv))
        self._static_off: str | None = None if self.static_kv else "off"
        self._static_proven = False
        self._slots = SlotPool(max_static_slots)
        self._graphs = StepGraphs(TorchGraphs(self.device) if self.cuda_graphs else None, self.cuda_graphs)
        self._dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    @classmethod
    def from_path(cls, path: str, device: str | None = None, verify: bool = True,
                  trust_remote_code: bool = False, cuda_graphs: bool | None = None) -> "TorchEngine":
        from rocket_deploy.artifact import load_artifact
        model, tokenizer, _ = load_artifact(path, verify=verify, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, device, cuda_graphs=cuda_graphs)

    @property
    def graph_stats(self) -> dict:
        """Decode steps captured / replayed / run eagerly, and why graphs or the static cache are off (None: on)."""
        return {**self._graphs.stats, "cuda_graphs": self._graphs.off_reason, "static_kv": self._static_off}

    @torch.inference_mode()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Any | None):
        if not self.is_decoder:
            ids = torch.as_tensor(input_ids, device=self.device)
            mask = torch.as_tensor(attention_mask, device=self.device)
            out = self.model(input_ids=ids, attention_mask=mask)
            return out.last_hidden_state.float().cpu().numpy(), None
        if isinstance(past, StaticKVState):
            return self._static_forward(input_ids, attention_mask, past)
        # padded prompts keep the dynamic cache: models differ in how they place padded positions (Llama counts
        # them, OPT skips them), and the static path passes position ids explicitly
        if past is None and self._static_off is None and np.all(np.asarray(attention_mask) == 1):
            state = self._open_static(np.shape(input_ids)[0], np.shape(attention_mask)[1])
            if state is not None:
                return self._static_forward(input_ids, attention_mask, state)
        ids = torch.as_tensor(input_ids, device=self.device)
        mask = torch.as_tensor(attention_mask, device=self.device)
        # prefill (past None): use_cache=True makes the model create the cache that fits its config
        # (DynamicCache(config=...): sliding-window layers included)
        kw = {} if past is None else {self._cache_arg: past}
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        return out.logits.float().cpu().numpy(), getattr(out, self._cache_arg)

    # ---- the static cache ---------------------------------------------------------------------------------------
    def _open_static(self, batch: int, total: int) -> StaticKVState | None:
        from .static_kv import StaticKV, UnsupportedModel, initial_length
        length = initial_length(total)
        state = StaticKVState(None)
        try:
            slot = self._slots.acquire(batch, state,
                                       lambda: StaticKV(self.model, batch, length, self.device, self._dtype),
                                       fits=lambda s: s.length > total, size=lambda s: s.length)
        except UnsupportedModel as e:
            self._static_off = str(e)
            log.warning("%s cannot use the static KV cache (%s); decoding with the dynamic cache, without CUDA "
                        "graphs", type(self.model).__name__, e)
            return None
        if slot is None:
            log.info("all %d static KV slots are busy; this generation uses the dynamic cache",
                     self._slots.max_slots)
            return None
        slot.reset()
        state.slot = slot
        return state

    def _static_forward(self, input_ids, attention_mask, state: StaticKVState):
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        slot = state.slot
        batch, new = ids.shape
        past = mask.shape[1] - new
        if batch != slot.batch or past != slot.filled:
            raise ValueError(f"past holds {slot.filled} tokens for batch {slot.batch}; the mask implies {past} past "
                             f"tokens for batch {batch}")
        if past + new > slot.length:
            length = slot.length
            while length < past + new:
                length *= 2
            grown = slot.grown(length)
            self._slots.replace(slot, grown)
            state.slot = slot = grown
        if new > 1 or past == 0:
            if self._static_proven:
                logits = slot.prefill(torch.from_numpy(ids).to(self.device), mask)
                return logits.float().cpu().numpy(), state
            try:   # the first static prefill of this engine: a model it does not fit falls back, once
                logits = slot.prefill(torch.from_numpy(ids).to(self.device), mask)
            except Exception as e:  # noqa: BLE001
                self._static_off = f"{type(e).__name__}: {e}"
                self._slots.clear()
                log.warning("the static KV cache failed on %s (%s); decoding with the dynamic cache, without CUDA "
                            "graphs", type(self.model).__name__, self._static_off)
                return self.forward(input_ids, attention_mask, None)
            self._static_proven = True
            return logits.float().cpu().numpy(), state
        slot.load_decode_inputs(ids, mask)
        self._graphs.step(slot, (batch, slot.length), slot.decode_step)
        slot.filled += 1
        out = slot.logits.float().cpu()     # the graph's output buffer: copied, the next replay overwrites it
        return (out.clone() if out.data_ptr() == slot.logits.data_ptr() else out).numpy(), state

    def model_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def close(self) -> None:
        self._slots.clear()
