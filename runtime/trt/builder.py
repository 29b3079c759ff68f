"""``build_engine``: an exported ONNX file -> a serialized TensorRT plan (+ its sidecar), with the TensorRT 10 API.

* one optimization profile (:class:`~.profiles.ShapeRanges`) computed from the ONNX inputs;
* a strongly typed network: precisions come from the graph (an fp16 export gives an fp16 engine);
* the plugin library is loaded first (required when the graph has the plugin's op);
* the parser's errors are reported one per node (:func:`format_parser_errors`);
* an optional timing cache (read when it exists, written back) and a progress monitor on stderr.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from rocket_deploy.onnx_contract import ONNX_OP, PAST_RE

from .importing import clear_errors, get_logger, import_tensorrt, recent_errors
from .onnx_graph import graph_inputs, load_graph, onnx_uses_op
from .plan_file import METADATA_FORMAT, atomic_write_bytes, plan_metadata_path
from .plugins import PLUGIN_BUILD_COMMAND, PLUGIN_ENV, PluginLibraryNotFound, find_plugin_library, load_plugins
from .profiles import ShapeRanges, format_profile


def format_parser_errors(errors: Iterable[Any]) -> str:
    """One line per ONNX parser error with node index, name and operator (TensorRT 10's parser errors carry them)."""
    lines = []
    for i, err in enumerate(errors):
        def call(attr, default=None):
            fn = getattr(err, attr, None)
            try:
                return fn() if callable(fn) else (fn if fn is not None else default)
            except Exception:  # noqa: BLE001
                return default
        node, name, op = call("node", -1), call("node_name", ""), call("node_operator", "")
        code = call("code", "")
        code = getattr(code, "name", str(code)).split(".")[-1] if code != "" else ""
        where = []
        if isinstance(node, int) and node >= 0:
            where.append(f"node {node}")
        if name:
            where.append(repr(str(name)))
        if op:
            where.append(f"({op})")
        desc = str(call("desc", "") or str(err))
        hint = ""
        if op == ONNX_OP or ONNX_OP in desc:
            hint = f" -- is the plugin library loaded? ({PLUGIN_BUILD_COMMAND}, or set ${PLUGIN_ENV})"
        lines.append(f"  [{i}] {' '.join(where) or 'graph'}: {desc}{' [' + code + ']' if code else ''}{hint}")
    return "\n".join(lines)


def _make_progress_monitor(trt):
    base = trt.IProgressMonitor

    class _Progress(base):
        """Prints the builder's top phases with their durations (thread-safe, as TensorRT requires)."""

        def __init__(self):
            base.__init__(self)
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._start: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name], self._start[phase_name] = depth, time.perf_counter()
                if depth <= 1:
                    print(f"{'  ' * depth}[build] {phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            with self._lock:
                depth = self._depth.pop(phase_name, 0)
                t0 = self._start.pop(phase_name, time.perf_counter())
                if depth <= 1:
                    print(f"{'  ' * depth}[build] {phase_name} done in {time.perf_counter() - t0:.1f}s",
                          file=sys.stderr, flush=True)

    return _Progress()


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, ranges: ShapeRanges,
                 timing_cache: str | os.PathLike | None = None, workspace_gb: float | None = None,
                 builder_optimization_level: int = 3, progress: bool = True,
                 plugin_library: str | os.PathLike | None = None, verbose: bool = False) -> Path:
    """Build a TensorRT engine from an exported ONNX file and write the serialized plan atomically.

    * ``timing_cache``: loaded when the file exists (a mismatching one is ignored with a warning) and saved back;
    * ``workspace_gb``: the builder's workspace pool limit (None: TensorRT's default, the device memory);
    * ``builder_optimization_level``: 0 (fast build) .. 5 (slowest build, most tactics); TensorRT's default is 3;
    * ``plugin_library``: the plugin library to load instead of :func:`~.plugins.find_plugin_library`'s.

    Writes ``plan_path`` and ``plan_path + ".json"`` (ranges, profile, versions) and returns ``plan_path``.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX model at {str(onnx_path)!r}")
    if not isinstance(ranges, ShapeRanges):
        raise TypeError(f"ranges must be a ShapeRanges, got {type(ranges).__name__}")
    if not 0 <= int(builder_optimization_level) <= 5:
        raise ValueError(f"builder optimization level must be in 0..5, got {builder_optimization_level}")
    if workspace_gb is not None and not workspace_gb > 0:
        raise ValueError(f"workspace must be > 0 GB, got {workspace_gb}")
    model = load_graph(onnx_path)
    profile_shapes = ranges.profile(graph_inputs(model))
    needs_plugin = onnx_uses_op(model)
    decoder = any(PAST_RE.match(n) for n in profile_shapes)
    del model

    trt = import_tensorrt()
    logger = get_logger(trt, verbose)
    clear_errors(logger)
    loaded_plugin = _load_plugin_for_build(trt, logger, needs_plugin, plugin_library)

    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external-data files relative to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} error(s)):\n"
                           f"{format_parser_errors(errors)}{recent_errors(logger)}")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(workspace_gb) * (1 << 30)))
    config.builder_optimization_level = int(builder_optimization_level)

    profile = builder.create_optimization_profile()
    for t in (network.get_input(i) for i in range(network.num_inputs)):
        if t.name not in profile_shapes:
            if any(int(d) < 0 for d in t.shape):
                raise RuntimeError(f"network input {t.name!r} (shape {tuple(t.shape)}) has no profile shapes")
            continue
        p = profile_shapes[t.name]
        profile.set_shape(t.name, p.min, p.opt, p.max)
    if config.add_optimization_profile(profile) < 0:
        raise RuntimeError(f"TensorRT rejected the optimization profile:\n{format_profile(profile_shapes)}"
                           f"{recent_errors(logger)}")

    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, False):
            print(f"[build] warning: timing cache {cache_path} does not match this TensorRT / GPU; starting a new "
                  f"one", file=sys.stderr)
            config.set_timing_cache(config.create_timing_cache(b""), False)
    if progress:
        config.progress_monitor = _make_progress_monitor(trt)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path}{recent_errors(logger)}")
    build_s = time.perf_counter() - t0

    if cache_path is not None:
        cache = config.get_timing_cache()
        if cache is not None:
            atomic_write_bytes(cache_path, memoryview(cache.serialize()))
    atomic_write_bytes(plan_path, memoryview(serialized))
    meta = {
        "format": METADATA_FORMAT,
        "onnx": str(onnx_path.resolve()),
        "tensorrt_version": str(getattr(trt, "__version__", "")),
        "decoder": decoder,
        "ranges": ranges.as_dict(),
        "max_context": ranges.context if decoder else None,
        "profile": {k: [list(v.min), list(v.opt), list(v.max)] for k, v in profile_shapes.items()},
        "plugin_library": str(loaded_plugin) if loaded_plugin else None,
        "uses_plugin": needs_plugin,
        "strongly_typed": True,
        "builder_optimization_level": int(builder_optimization_level),
        "workspace_gb": workspace_gb,
        "build_seconds": round(build_s, 2),
        "device": _cuda_device_name(),
    }
    atomic_write_bytes(plan_metadata_path(plan_path), json.dumps(meta, indent=2).encode())
    return plan_path


def _load_plugin_for_build(trt, logger, needs_plugin: bool, plugin_library) -> Path | None:
    """The plugin library, loaded: required when the graph uses the op or a library was named; otherwise loaded
    when one is found (a warning, not an error, when that fails)."""
    if needs_plugin or plugin_library is not None:
        return load_plugins(trt, logger, plugin_library)
    found = None
    with contextlib.suppress(PluginLibraryNotFound):
        found = find_plugin_library()
    if found is None:
        return None
    try:
        return load_plugins(trt, logger, found)
    except Exception as e:  # noqa: BLE001 -- the graph does not need it
        print(f"[build] warning: plugin library {found} not loaded ({e}); the graph does not use it", file=sys.stderr)
        return None


def _cuda_device_name() -> str | None:
    try:
        import torch  # noqa: PLC0415
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            return f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
    except Exception:  # noqa: BLE001
        pass
    return None
