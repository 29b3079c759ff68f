"""A fake ``tensorrt`` module for the TensorRT backend tests (no TensorRT, no GPU).

It implements only what :mod:`rocket_deploy.runtime.trt` calls of the TensorRT 10 Python API, in host memory, and
records what it was asked to do:

* :func:`plugin_registry_module` -- ``get_plugin_registry`` / ``init_libnvinfer_plugins`` (``load_plugins``);
* :class:`FakeBuilder` -- ``Builder``, ``OnnxParser``, builder config, optimization profile, timing cache and
  ``IProgressMonitor`` (``build_engine``);
* :func:`install_runtime` with :class:`FakeEngine` -- ``Runtime``, ``ICudaEngine`` and ``IExecutionContext`` over
  numpy: the context reads the inputs from the addresses ``TrtEngine`` binds (CPU torch tensors here), computes the
  outputs with a numpy function and writes them to the bound output addresses -- the same contract as on a GPU.

Fixtures (import them into a test module): ``no_tensorrt``, ``no_plugin``, ``fake_build``.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import types
from typing import Callable, Mapping

import numpy as np
import pytest

from rocket_deploy.runtime.trt import importing, plugins
from rocket_deploy.runtime.trt.engine import TrtEngine
from rocket_deploy.runtime.trt.onnx_graph import read_onnx_inputs

PLAN_BLOB = b"FAKEPLAN"      # the only plan the fake Runtime deserializes
STREAM_HANDLE = 1234         # the stream handle TrtEngine must pass to execute_async_v3
_C_TYPES = {"INT64": (np.int64, ctypes.c_int64), "FLOAT": (np.float32, ctypes.c_float),
            "INT32": (np.int32, ctypes.c_int32), "HALF": (np.float16, ctypes.c_uint16)}


class ILogger:
    def __init__(self):
        pass


def install(monkeypatch, module) -> None:
    """Make ``import tensorrt`` return ``module`` and forget the process logger (it subclasses the old ILogger).
    Export ONNX graphs before installing: ``torch.export`` probes ``tensorrt`` and refuses a module without a spec."""
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(importing, "_LOGGER", None)


# ---- plugin registry ---------------------------------------------------------------------------------------------
def plugin_registry_module(creators, load_result="handle"):
    """A module with a plugin registry listing ``creators``; ``load_library`` returns ``load_result``. Returns
    ``(module, calls)`` with the paths loaded and the number of ``init_libnvinfer_plugins`` calls."""
    calls = {"load": [], "init": 0}

    class Registry:
        @property
        def all_creators(self):
            return [types.SimpleNamespace(name=n) for n in creators]

        def load_library(self, path):
            calls["load"].append(path)
            return load_result

    reg = Registry()

    def init(logger, namespace):
        calls["init"] += 1

    return types.SimpleNamespace(get_plugin_registry=lambda: reg, init_libnvinfer_plugins=init,
                                 __version__="10.3.0"), calls


# ---- builder -------------------------------------------------------------------------------------------------------
class FakeBuilder:
    """``.module`` is a fake ``tensorrt`` for build_engine; ``.calls`` records the network flags, profile shapes,
    workspace, optimization level, timing cache read and progress monitor."""

    def __init__(self, parse_ok=True, build_ok=True, parser_errors=(), version="10.3.0"):
        self.parse_ok, self.build_ok, self.parser_errors = parse_ok, build_ok, list(parser_errors)
        self.calls: dict = {"set_shape": {}, "flags": None, "pool": None, "opt_level": None, "cache_in": None,
                            "monitor": None}
        rec = self

        class IProgressMonitor:
            def __init__(self):
                pass

        class Profile:
            def set_shape(self, name, lo, op, hi):
                rec.calls["set_shape"][name] = (tuple(lo), tuple(op), tuple(hi))

        class Cache:
            def __init__(self, blob):
                self.blob = bytes(blob)

            def serialize(self):
                return b"CACHE+" + self.blob

        class Config:
            def __init__(self):
                self._cache = None

            def set_memory_pool_limit(self, pool, size):
                rec.calls["pool"] = (pool, size)

            @property
            def builder_optimization_level(self):
                return rec.calls["opt_level"]

            @builder_optimization_level.setter
            def builder_optimization_level(self, v):
                rec.calls["opt_level"] = v

            @property
            def progress_monitor(self):
                return rec.calls["monitor"]

            @progress_monitor.setter
            def progress_monitor(self, m):
                rec.calls["monitor"] = m

            def add_optimization_profile(self, profile):
                return 0

            def create_timing_cache(self, blob):
                return Cache(blob)

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.blob == b"BAD":
                    return False
                rec.calls["cache_in"] = cache.blob
                self._cache = cache
                return True

            def get_timing_cache(self):
                return self._cache

        class Network:
            def __init__(self):
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                for gi in read_onnx_inputs(path):
                    shape = tuple(d if isinstance(d, int) else -1 for d in gi.dims)
                    self.network.inputs.append(types.SimpleNamespace(name=gi.name, shape=shape))
                return rec.parse_ok

            @property
            def num_errors(self):
                return len(rec.parser_errors)

            def get_error(self, i):
                return rec.parser_errors[i]

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.calls["flags"] = flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"SERIALIZED-PLAN" if rec.build_ok else None

        self.module = types.SimpleNamespace(
            __version__=version, ILogger=ILogger, IProgressMonitor=IProgressMonitor, Builder=Builder,
            OnnxParser=Parser, NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=2),
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))


# ---- runtime -------------------------------------------------------------------------------------------------------
def _view(ptr: int, shape, trt_name: str) -> np.ndarray:
    np_t, c_t = _C_TYPES[trt_name]
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, np_t)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(c_t)), shape=tuple(shape)).view(np_t)


class FakeContext:
    """An execution context: outputs are ``engine.compute(inputs)``, read from / written to the bound addresses."""

    def __init__(self, engine: "FakeEngine"):
        self.engine, self.shapes, self.addr, self.runs = engine, {}, {}, 0
        self._outputs: dict[str, np.ndarray] = {}

    def set_input_shape(self, name, shape):
        assert self.engine.modes[name] == "INPUT", name
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        assert ptr, f"null address for {name}"
        self.addr[name] = ptr

    def _inputs(self) -> dict[str, np.ndarray]:
        return {n: _view(self.addr[n], s, self.engine.dtypes[n]).copy() for n, s in self.shapes.items()}

    def infer_shapes(self):
        self._outputs = self.engine.compute(self._inputs())
        return []

    def get_tensor_shape(self, name):
        return tuple(self._outputs[name].shape)

    def execute_async_v3(self, stream_handle):
        assert stream_handle == STREAM_HANDLE
        for name, value in self.engine.compute(self._inputs()).items():
            _view(self.addr[name], value.shape, self.engine.dtypes[name])[...] = value
        self.runs += 1
        return True


class FakeEngine:
    """An ICudaEngine: ``io`` = ``{name: ("INPUT" | "OUTPUT", TensorRT dtype name, engine shape with -1)}`` in
    binding order, ``profile`` = ``{input: (min, opt, max)}``, ``compute(inputs) -> {output: array}``."""

    def __init__(self, io: Mapping[str, tuple[str, str, tuple]], profile: Mapping, compute: Callable):
        self.names = list(io)
        self.modes = {n: m for n, (m, _, _) in io.items()}
        self.dtypes = {n: d for n, (_, d, _) in io.items()}
        self.shapes = {n: tuple(s) for n, (_, _, s) in io.items()}
        self.profile, self.compute = dict(profile), compute
        self.num_io_tensors = len(self.names)
        self.context: FakeContext | None = None

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.modes[name]

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self.dtypes[name])

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return list(self.profile[name])

    def create_execution_context(self):
        self.context = FakeContext(self)
        return self.context


def install_runtime(monkeypatch, make_engine: Callable[[], FakeEngine], version: str = "10.8.0"):
    """A fake ``tensorrt`` whose Runtime deserializes :data:`PLAN_BLOB` into ``make_engine()`` (anything else:
    None, as TensorRT does), and a TrtEngine that runs on the CPU: device, device scope and stream are patched.
    Returns the list of engines deserialized so far."""
    engines: list[FakeEngine] = []

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            if blob != PLAN_BLOB:
                return None
            engines.append(make_engine())
            return engines[-1]

    import torch
    install(monkeypatch, types.SimpleNamespace(__version__=version, ILogger=ILogger, Runtime=Runtime,
                                               TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")))
    monkeypatch.setattr(TrtEngine, "_resolve_device", lambda self, device: torch.device("cpu"))
    monkeypatch.setattr(TrtEngine, "_device_scope", lambda self: contextlib.nullcontext())
    monkeypatch.setattr(TrtEngine, "_stream",
                        lambda self: types.SimpleNamespace(cuda_stream=STREAM_HANDLE, synchronize=lambda: None))
    return engines


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def no_plugin(monkeypatch, tmp_path):
    """No plugin library anywhere: env unset, search roots pointed at empty folders, nothing loaded yet."""
    monkeypatch.delenv(plugins.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(plugins, "_SOURCE_ROOT", tmp_path / "src")
    monkeypatch.setattr(plugins, "_PACKAGE_DIR", tmp_path / "src" / "pkg" / "runtime")
    monkeypatch.setattr(plugins, "_LOADED_PLUGINS", {})


@pytest.fixture
def fake_build(monkeypatch, no_plugin):
    """``fake_build(**kw)`` installs a :class:`FakeBuilder` as ``tensorrt`` and returns it."""
    def make(**kw) -> FakeBuilder:
        fb = FakeBuilder(**kw)
        install(monkeypatch, fb.module)
        return fb
    return make
