"""Which export stand-in replaces which layer while the model is traced, per target.

* :class:`~rocket_deploy.rocket_linear.RocketLinear` -> :class:`.rocket_op.ExportRocketLinear` (both targets);
* quantized layers -> :mod:`.quant_ort` (``ort``) or :mod:`.quant_trt` (``trt``) stand-ins
  (:func:`export_module_for`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.targets import set_module

from .rocket_op import ExportRocketLinear


def export_module_for(mod: nn.Module, int8_fused: bool = False, *, target: str = "ort",
                      dtype: torch.dtype = torch.float32, accuracy_level: int = 0) -> nn.Module | None:
    """The export stand-in of a quantized module, or None when ``mod`` is not quantized.

    ``target`` "ort" (standard ops + ``com.microsoft.MatMulNBits``; ``int8_fused`` and the int4 ``accuracy_level``
    apply) or "trt" (weight-only DequantizeLinear + the plugin node with quantized V); ``dtype``: the compute dtype
    of the graph."""
    from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear
    if target == "trt":
        from .quant_trt import TrtQuantDenseLinear, TrtQuantRocketLinear
        if isinstance(mod, QuantRocketLinear):
            return TrtQuantRocketLinear(mod, dtype)
        if isinstance(mod, QuantDenseLinear):
            return TrtQuantDenseLinear(mod, dtype)
        return None
    if target != "ort":
        raise ValueError(f"target must be 'ort' or 'trt', got {target!r}")
    from .quant_ort import ExportQuantDenseLinear, ExportQuantRocketLinear
    if isinstance(mod, QuantRocketLinear):
        return ExportQuantRocketLinear(mod, int8_fused, dtype, accuracy_level)
    if isinstance(mod, QuantDenseLinear):
        return ExportQuantDenseLinear(mod, int8_fused, dtype, accuracy_level)
    return None


def stand_in(mod: nn.Module, target: str = "ort", dtype: torch.dtype = torch.float32,
             int8_compute: str = "weight-only", int4_accuracy_level: int = 0) -> nn.Module | None:
    """The export stand-in of any ROCKET or quantized layer (None for other modules)."""
    if isinstance(mod, RocketLinear):
        return ExportRocketLinear(mod)
    return export_module_for(mod, int8_compute == "dynamic", target=target, dtype=dtype,
                             accuracy_level=int4_accuracy_level)


@contextlib.contextmanager
def export_modules(model: nn.Module, target: str = "ort", dtype: torch.dtype = torch.float32,
                   int8_compute: str = "weight-only", int4_accuracy_level: int = 0):
    """Temporarily replace every RocketLinear and every quantized layer (QuantRocketLinear / QuantDenseLinear) of
    ``model`` by its export stand-in for ``target`` (:func:`stand_in`). Yields the number of ROCKET layers."""
    from rocket_deploy.quant_linear import QUANT_MODULES, QuantRocketLinear
    swapped = [(n, m) for n, m in model.named_modules() if isinstance(m, (RocketLinear, *QUANT_MODULES))]
    n_rocket = 0
    for name, mod in swapped:
        set_module(model, name, stand_in(mod, target, dtype, int8_compute, int4_accuracy_level))
        n_rocket += isinstance(mod, (RocketLinear, QuantRocketLinear))
    try:
        yield n_rocket
    finally:
        for name, mod in swapped:
            set_module(model, name, mod)
