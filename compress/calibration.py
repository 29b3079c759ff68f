"""Calibration hooks: capture the inputs of the first transformer block, then run blocks one at a time while
forward hooks accumulate each block's input Grams ``X^T X`` in float64.

Peak memory is one block's activations for the calibration set plus that block's Grams, not the whole model's.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn


class _StopForward(Exception):
    pass


class BlockInputs:
    """Hidden states entering a block, per calibration batch, plus the keyword arguments the model passes
    to every block (attention mask, rotary embeddings, ...), captured once per batch."""

    def __init__(self):
        self.hidden: list[torch.Tensor] = []
        self.args: list[tuple] = []
        self.kwargs: list[dict[str, Any]] = []

    def __len__(self):
        return len(self.hidden)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Iterator[torch.Tensor],
                         device: torch.device) -> BlockInputs:
    cap = BlockInputs()

    def hook(_mod, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        cap.hidden.append(hidden.detach())
        cap.args.append(rest)
        cap.kwargs.append(dict(kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            ids = ids.to(device)
            try:
                kw = {"use_cache": False} if _accepts_use_cache(model) else {}
                model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return cap


def _accepts_use_cache(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache")


class GramAccumulator:
    """Forward hooks on a block's target linears accumulating ``X^T X`` (float64) per distinct input.

    Layers fed the very same tensor (q/k/v; gate/up) share one Gram: the first forward call records which
    layers see an identical input object and later calls compute that Gram once.
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.group_of: dict[str, str] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._last_input: torch.Tensor | None = None
        self._last_group: str | None = None
        self._handles = []

    def __enter__(self):
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last_input = None

    def _make_hook(self, name: str):
        def hook(_mod, args, _out):
            x = args[0]
            if self._last_input is not None and x is self._last_input:
                group = self._last_group
                self.group_of.setdefault(name, group)
                return
            group = self.group_of.setdefault(name, name)
            self._last_input, self._last_group = x, group
            if group != name:      # a sharer seen first in an earlier call; its Gram is counted there
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            g = x2.t() @ x2
            if group in self.grams:
                self.grams[group] += g
                self.tokens[group] += x2.shape[0]
            else:
                self.grams[group], self.tokens[group] = g, x2.shape[0]
        return hook

    def end_batch(self) -> None:
        self._last_input = None

    def gram(self, name: str) -> torch.Tensor:
        return self.grams[self.group_of[name]]
