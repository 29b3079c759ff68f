"""Torch backend: runs a transformers model (dense, or a loaded ROCKET artifact) behind :class:`Engine`."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rocket_deploy.hf_compat import cache_kwarg

from . import kernels
from .engine import Engine, context_from_config


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model: torch.nn.Module, tokenizer=None, device: str | None = None):
        kernels.enable()      # RocketLinear layers use the compiled sparse-V kernels on CUDA when available
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.is_decoder = bool(getattr(model.config, "is_decoder", False)) or hasattr(model, "lm_head") \
            or "ForCausalLM" in type(model).__name__
        self._cache_arg = cache_kwarg(model)   # ``cache`` (transformers 5.x) or ``past_key_values`` (4.x)
        self.max_context = context_from_config(model.config) if self.is_decoder else None

    @classmethod
    def from_path(cls, path: str, device: str | None = None, verify: bool = True,
                  trust_remote_code: bool = False) -> "TorchEngine":
        from rocket_deploy.artifact import load_artifact
        model, tokenizer, _ = load_artifact(path, verify=verify, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, device)

    @torch.inference_mode()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Any | None):
        ids = torch.as_tensor(input_ids, device=self.device)
        mask = torch.as_tensor(attention_mask, device=self.device)
        if not self.is_decoder:
            out = self.model(input_ids=ids, attention_mask=mask)
            return out.last_hidden_state.float().cpu().numpy(), None
        # prefill (past None): use_cache=True makes the model create the cache that fits its config
        # (DynamicCache(config=...): sliding-window layers included)
        kw = {} if past is None else {self._cache_arg: past}
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        return out.logits.float().cpu().numpy(), getattr(out, self._cache_arg)

    def model_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total
