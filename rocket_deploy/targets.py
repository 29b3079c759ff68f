"""Finding the repeated transformer blocks and the ``nn.Linear`` layers to compress."""
from __future__ import annotations

import re
from typing import Sequence

from torch import nn


class TargetError(ValueError):
    """No layers matched, or the model has no block structure."""


def select_targets(model: nn.Module, patterns: Sequence[str], exclude: Sequence[str] = ()) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` modules whose qualified name matches a pattern (re.search) and no exclude pattern."""
    inc = [re.compile(p) for p in patterns]
    exc = [re.compile(p) for p in exclude]
    out = {}
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and any(p.search(name) for p in inc) and not any(p.search(name) for p in exc):
            out[name] = mod
    if not out:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise TargetError(f"no nn.Linear layer matches the target patterns {list(patterns)}; "
                          f"layers in this model include {linears}; pass --targets with matching regexes")
    return out


def find_blocks(model: nn.Module, targets: dict[str, nn.Linear]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of repeated blocks that holds the most target layers."""
    best, best_count = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            count = sum(1 for t in targets if t.startswith(name + "."))
            if count > best_count:
                best, best_count = (name, mod), count
    if best is None:
        raise TargetError("the model has no nn.ModuleList of transformer blocks holding the target layers")
    outside = [t for t in targets if not t.startswith(best[0] + ".")]
    if outside:
        raise TargetError(f"target layers outside the transformer blocks are not supported: {outside[:4]}; "
                          "exclude them with --exclude")
    return best


def block_targets(block_prefix: str, index: int, targets: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    pre = f"{block_prefix}.{index}."
    return {n: m for n, m in targets.items() if n.startswith(pre)}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
