"""rocket-deploy: training-free ROCKET compression and deployment of transformer models.

Public API (imported lazily so ``import rocket_deploy`` stays light)::

    import rocket_deploy as rd
    lm = rd.load_model("smollm2-135m")
    result = rd.compress_model(lm.model, lm.tokenizer, rd.RocketConfig(budget=0.3), out="smol-0.3")
    model2 = rd.load("smol-0.3")
"""
from __future__ import annotations

from ._version import __version__

_LAZY = {
    "RocketConfig": ("rocket_deploy.config", "RocketConfig"),
    "CalibrationConfig": ("rocket_deploy.config", "CalibrationConfig"),
    "RocketLinear": ("rocket_deploy.rocket_linear", "RocketLinear"),
    "load": ("rocket_deploy.workflows.api", "load"),
    "load_artifact": ("rocket_deploy.artifact", "load_artifact"),
    "load_model": ("rocket_deploy.models", "load_model"),
    "compress_model": ("rocket_deploy.compress.pipeline", "compress"),
    "prepare_calibration": ("rocket_deploy.compress.pipeline", "prepare_calibration"),
    "profile": ("rocket_deploy.compress.pipeline", "profile"),
    "open_engine": ("rocket_deploy.runtime.engine", "open_engine"),
}

__all__ = sorted(_LAZY) + ["__version__"]

# transformers' from_pretrained / pipeline load artifacts through rocket-deploy's quantizer (quant_method "rocket"),
# registered lazily: now if transformers' quantizer table is imported, else when it is (rocket_deploy/hf_register.py)
from . import hf_register as _hf_register  # noqa: E402 -- standard library only

_hf_register.install()


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rocket_deploy' has no attribute {name!r}")
