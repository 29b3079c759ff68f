"""The public functions that span stages (re-exported lazily by ``rocket_deploy``)."""
from __future__ import annotations

import torch


def load(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load an artifact as a working transformers model (:func:`rocket_deploy.artifact.load`), with the runtime's
    compiled sparse-V kernels enabled for CUDA tensors (they are looked for on the first CUDA forward)."""
    from rocket_deploy.artifact import load as load_artifact_model
    from rocket_deploy.runtime import kernels
    kernels.enable()
    return load_artifact_model(path, dtype=dtype, device=device)
