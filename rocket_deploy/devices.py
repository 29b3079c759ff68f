"""Compute devices: ``cpu``, ``cuda`` or ``cuda:N``, checked when named (one-line errors naming the fix)."""
from __future__ import annotations

import re


class DeviceError(ValueError):
    pass


def resolve_device(spec) -> "torch.device":  # noqa: F821 -- torch imported lazily
    """The ``torch.device`` for ``spec`` (``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``), with ``cuda``
    resolved to the current CUDA device's index; :class:`DeviceError` when it does not exist on this machine."""
    import torch
    text = str(spec).strip().lower()
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text)
    if not m or (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        raise DeviceError(f"unknown device {str(spec)!r}; use cpu, cuda or cuda:N")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    if torch.version.cuda is None:
        raise DeviceError(f"CUDA is not available (torch {torch.__version__} is built without CUDA); "
                          "use --device cpu or install a CUDA build of torch")
    if not torch.cuda.is_available():
        raise DeviceError(f"CUDA is not available (torch {torch.__version__} is built for CUDA {torch.version.cuda} "
                          "but sees no GPU); check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, "
                          "or use --device cpu")
    n = torch.cuda.device_count()
    index = int(m.group(2)) if m.group(2) is not None else torch.cuda.current_device()
    if index >= n:
        raise DeviceError(f"CUDA device cuda:{index} does not exist (this machine has {n}: "
                          f"{', '.join(f'cuda:{i}' for i in range(n))}); use --device cuda:0"
                          f"{f' .. cuda:{n - 1}' if n > 1 else ''} or --device cpu")
    return torch.device("cuda", index)
