"""The one backend registry: which engine runs which path, used by ``open_engine``, ``bench`` and ``sweep``.

=========  ==========================================  ===========================================
name       opens                                       engine
=========  ==========================================  ===========================================
``torch``  an artifact directory (``rocket.json``)     :class:`~rocket_deploy.runtime.torch_backend.TorchEngine`
``ort``    an exported ``.onnx`` or its export folder  :class:`~rocket_deploy.runtime.ort_backend.OrtEngine`
``trt``    a serialized TensorRT engine (``.plan``)    :class:`~rocket_deploy.runtime.trt.TrtEngine`
=========  ==========================================  ===========================================

Engines are imported only when opened (onnxruntime and tensorrt stay lazy).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable

from rocket_deploy.onnx_contract import MODEL_FILE, is_export_dir

ARTIFACT_MANIFEST = "rocket.json"
TRT_SUFFIXES = (".plan", ".engine")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    engine: str                          # "module:Class", imported on first use
    accepts: Callable[[str], bool]       # does this backend run that path?
    resolve: Callable[[str], str]        # the path handed to the engine
    kwargs: tuple[str, ...]              # the open options it understands (others are dropped, never passed)
    describe: str

    def engine_class(self):
        module, cls = self.engine.split(":")
        return getattr(importlib.import_module(module), cls)

    def open(self, path: str, **kwargs: Any):
        cls = self.engine_class()
        opts = {k: v for k, v in kwargs.items() if k in self.kwargs and v is not None}
        p = self.resolve(path)
        return cls.from_path(p, **opts) if hasattr(cls, "from_path") else cls(p, **opts)


def _is_artifact(p: str) -> bool:
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, ARTIFACT_MANIFEST))


def _is_onnx(p: str) -> bool:
    return p.endswith(".onnx") or (is_export_dir(p) and not _is_artifact(p))


def _onnx_path(p: str) -> str:
    return os.path.join(p, MODEL_FILE) if os.path.isdir(p) else p


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", "rocket_deploy.runtime.torch_backend:TorchEngine", _is_artifact, lambda p: p,
            ("device", "verify", "trust_remote_code", "cuda_graphs"), "an artifact directory"),
    Backend("ort", "rocket_deploy.runtime.ort_backend:OrtEngine", _is_onnx, _onnx_path,
            ("threads", "providers", "tokenizer"), "a .onnx file or an export folder"),
    Backend("trt", "rocket_deploy.runtime.trt:TrtEngine", lambda p: p.endswith(TRT_SUFFIXES), lambda p: p,
            ("device", "plugin_library", "tokenizer", "cuda_graphs"), "a .plan / .engine file"),
)}
BACKEND_NAMES = tuple(BACKENDS)


class BackendError(ValueError):
    """No backend runs that path, or the named backend does not exist; the message lists what would."""


def detect_backend(path: str) -> str:
    p = str(path)
    for b in BACKENDS.values():
        if b.accepts(p):
            return b.name
    kinds = "; ".join(f"{b.name}: {b.describe}" for b in BACKENDS.values())
    raise BackendError(f"no model at {p!r}: expected {kinds}")


def open_backend(path: str | os.PathLike, backend: str | None = None, **kwargs: Any):
    """Open ``path`` with ``backend`` (None: the one the path implies). Options a backend does not take are
    ignored (``threads`` only means something to ONNX Runtime)."""
    p = str(path)
    name = backend or detect_backend(p)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    b = BACKENDS[name]
    if name == "torch" and not os.path.isdir(p):
        raise BackendError(f"the torch backend runs an artifact directory; {p!r} is not a directory")
    if not os.path.exists(b.resolve(p)):
        raise FileNotFoundError(f"{b.resolve(p)} does not exist; pass {b.describe}")
    return b.open(p, **kwargs)
