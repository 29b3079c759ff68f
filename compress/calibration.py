"""Calibration hooks: capture the inputs of the first transformer block, then run blocks one at a time while
forward hooks accumulate each block's input Grams ``X^T X`` in float64.

Peak memory is one block's activations for the calibration set plus that block's Grams, not the whole model's.
On an accelerator the model stays on the CPU (offload): :func:`non_blocks_on` moves the tensors outside the
blocks (embeddings, rotary tables, final norm, head) there for the capture, :func:`block_on` one block at a time.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .whitening import gram


class _StopForward(Exception):
    pass


def _move_direct(module: nn.Module, device: torch.device) -> list:
    """Move ``module``'s own parameters and buffers (not its children's) to ``device``; returns how to undo it.
    Parameters keep their identity (``.data`` is swapped), so tied weights stay tied."""
    undo = []
    for name, p in module._parameters.items():
        if p is not None and p.device != device:
            undo.append((module, "p", name, p.device))
            p.data = p.data.to(device)
    for name, b in module._buffers.items():
        if b is not None and b.device != device:
            undo.append((module, "b", name, b.device))
            module._buffers[name] = b.to(device)
    return undo


def _restore(undo: list) -> None:
    for module, kind, name, dev in reversed(undo):
        if kind == "p":
            p = module._parameters[name]
            p.data = p.data.to(dev)
        else:
            module._buffers[name] = module._buffers[name].to(dev)


@contextlib.contextmanager
def non_blocks_on(model: nn.Module, blocks: nn.ModuleList, device: str | torch.device):
    """Inside: every parameter / buffer of ``model`` outside ``blocks`` lives on ``device`` (the blocks stay
    where they are); afterwards each goes back to where it was. A no-op when everything is there already."""
    device = torch.device(device)
    in_blocks = {id(m) for m in blocks.modules()}
    undo = []
    try:
        for m in model.modules():
            if id(m) not in in_blocks:
                undo += _move_direct(m, device)
        yield
    finally:
        _restore(undo)


@contextlib.contextmanager
def block_on(block: nn.Module, device: str | torch.device):
    """Inside: ``block``'s parameters and buffers live on ``device``; afterwards back where they were."""
    device = torch.device(device)
    undo = []
    try:
        for m in block.modules():
            undo += _move_direct(m, device)
        yield
    finally:
        _restore(undo)


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
            g = gram(x2)
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
