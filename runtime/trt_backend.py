"""TensorRT backend: build engines from our ONNX exports and run them behind :class:`Engine`.

Three layers, from pure host logic to GPU code:

* **Plugin discovery** -- :func:`find_plugin_library` / :func:`load_plugins` for ``librocket_trt_plugins.so``, which
  implements the ``RocketSparseVMatMul`` op (domain ``rocket``) of the exported graphs.
* **Optimization profiles** -- :class:`DimRange`, :class:`ShapeRanges` and :func:`read_onnx_inputs` turn the
  user's batch / sequence / context ranges and the ONNX graph's inputs (read with the ``onnx`` package, no TensorRT)
  into min / opt / max shapes for every input, including the past KV cache (past length 0 .. max context) and the
  attention mask (past + new tokens).
* **TensorRT** -- :func:`build_engine` (ONNX -> serialized plan) and :class:`TrtEngine` (plan -> ``forward``),
  written against the TensorRT 10.x Python API, which is imported lazily: everything above works without it.

The plan gets a JSON sidecar (``model.plan.json``) with the ranges it was built for and the TensorRT version; the
engine uses it to enforce the maximum context and to explain version mismatches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from .engine import Engine

PLUGIN_ENV = "ROCKET_TRT_PLUGIN"
PLUGIN_FILENAME = "librocket_trt_plugins.so"
ROCKET_OP = "RocketSparseVMatMul"
ROCKET_DOMAIN = "rocket"
PLUGIN_BUILD_COMMAND = ("cmake -S plugins_trt -B plugins_trt/build -DTensorRT_ROOT=/path/to/TensorRT "
                        "&& cmake --build plugins_trt/build -j")
TENSORRT_INSTALL_HINT = ("TensorRT is not installed; pip install tensorrt (x86-64 / JetPack ships it on Jetson: "
                         "create the venv with --system-site-packages to see it)")
METADATA_SUFFIX = ".json"
METADATA_FORMAT = 1

# Source checkout layout: <root>/runtime/trt_backend.py and <root>/plugins_trt/build*/librocket_trt_plugins.so.
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parent

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
_TOKEN_INPUTS = ("input_ids", "position_ids", "token_type_ids")


# ================================================================================================================
# TensorRT import and logging
# ================================================================================================================
class TensorRTNotInstalled(ImportError):
    """``import tensorrt`` failed; the message says how to install it."""


def import_tensorrt():
    """``import tensorrt`` with a clear error when it is missing."""
    try:
        import tensorrt as trt  # noqa: PLC0415 -- lazy on purpose
    except ImportError as e:  # includes a None entry in sys.modules
        raise TensorRTNotInstalled(f"{TENSORRT_INSTALL_HINT} (import error: {e})") from e
    return trt


def tensorrt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        return 0


_LOGGER = None
_LOGGER_LOCK = threading.Lock()


def get_logger(trt, verbose: bool = False):
    """One TensorRT logger per process (TensorRT warns when builders / runtimes get different ones). It forwards
    messages at WARNING and above (INFO and above when ``verbose``) to stderr and keeps the recent errors so that a
    failed build or deserialization can quote them."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            class _RecordingLogger(trt.ILogger):
                def __init__(self):
                    trt.ILogger.__init__(self)
                    self.verbose = False
                    self.errors: list[str] = []

                def log(self, severity, msg):
                    sev = getattr(severity, "name", str(severity)).split(".")[-1]
                    if sev in ("INTERNAL_ERROR", "ERROR"):
                        self.errors.append(str(msg))
                        del self.errors[:-20]
                    if sev in ("INTERNAL_ERROR", "ERROR", "WARNING") or (self.verbose and sev == "INFO") \
                            or (self.verbose and os.environ.get("ROCKET_TRT_VERBOSE") and sev == "VERBOSE"):
                        print(f"[TensorRT {sev}] {msg}", file=sys.stderr, flush=True)

            _LOGGER = _RecordingLogger()
        _LOGGER.verbose = bool(verbose)
        return _LOGGER


def _recent_errors(logger) -> str:
    errs = list(getattr(logger, "errors", []))
    return ("\nTensorRT said:\n  " + "\n  ".join(errs[-8:])) if errs else ""


def _clear_errors(logger) -> None:
    if hasattr(logger, "errors"):
        logger.errors.clear()


# ================================================================================================================
# Plugin library
# ================================================================================================================
class PluginLibraryNotFound(FileNotFoundError):
    """The RocketSparseVMatMul plugin library could not be found (the message says how to build it)."""


def plugin_search_paths() -> list[Path]:
    """Where :func:`find_plugin_library` looks after ``$ROCKET_TRT_PLUGIN``, in order (glob patterns resolved)."""
    plugins = _SOURCE_ROOT / "plugins_trt"
    found: list[Path] = []
    # CMake puts the library at the top of the build tree, or in a per-config / lib subfolder.
    for pattern in (f"build*/{PLUGIN_FILENAME}", f"build*/*/{PLUGIN_FILENAME}"):
        hits = [Path(p) for p in glob.glob(str(plugins / pattern))]
        found.extend(sorted(hits, key=lambda p: p.stat().st_mtime, reverse=True))  # newest build first
    found.append(_PACKAGE_DIR / PLUGIN_FILENAME)            # shipped next to the runtime package
    found.append(_PACKAGE_DIR.parent / PLUGIN_FILENAME)     # ... or next to the top-level package
    return found


def find_plugin_library() -> Path | None:
    """The plugin library to load: ``$ROCKET_TRT_PLUGIN`` if set (it must exist), else the source checkout's
    ``plugins_trt/build*/librocket_trt_plugins.so``, else one shipped next to the package; ``None`` if none."""
    env = os.environ.get(PLUGIN_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise PluginLibraryNotFound(
                f"${PLUGIN_ENV} points to {str(p)!r}, which is not a file; fix the path or unset {PLUGIN_ENV} "
                f"to use the library built in the source checkout ({PLUGIN_BUILD_COMMAND})")
        return p.resolve()
    for p in plugin_search_paths():
        if p.is_file():
            return p.resolve()
    return None


def missing_plugin_message() -> str:
    looked = "\n  ".join(str(p) for p in plugin_search_paths()) or "(no build folder under plugins_trt/)"
    return (f"the TensorRT plugin library {PLUGIN_FILENAME} (it implements the {ROCKET_OP} op) was not found.\n"
            f"Build it from the source checkout:\n  {PLUGIN_BUILD_COMMAND}\n"
            f"or point ${PLUGIN_ENV} at the built library. Looked in:\n  {looked}\n"
            f"  (plugins_trt/build*/{PLUGIN_FILENAME} under {_SOURCE_ROOT})")


_LOADED_PLUGINS: dict[str, Any] = {}


def registered_creator_names(trt) -> set[str]:
    """Names of the plugin creators in TensorRT's global registry (V2 and V3 creators)."""
    reg = trt.get_plugin_registry()
    names: set[str] = set()
    for attr in ("all_creators", "plugin_creator_list"):
        try:
            creators = getattr(reg, attr)
        except Exception:  # noqa: BLE001 -- deprecated attributes may raise on newer versions
            continue
        for c in creators or []:
            name = getattr(c, "name", None)
            if name:
                names.add(str(name))
    return names


def load_plugins(trt, logger, path: str | os.PathLike | None = None, required_op: str | None = ROCKET_OP) -> Path:
    """Register TensorRT's own plugins and load ``librocket_trt_plugins.so`` into the plugin registry (once per
    process). ``path`` overrides :func:`find_plugin_library`. Raises :class:`PluginLibraryNotFound` with the build
    command when there is no library, and ``RuntimeError`` when it loads but does not register ``required_op``."""
    lib = Path(path).expanduser().resolve() if path is not None else find_plugin_library()
    if lib is None:
        raise PluginLibraryNotFound(missing_plugin_message())
    if not lib.is_file():
        raise PluginLibraryNotFound(f"plugin library {str(lib)!r} does not exist.\n" + missing_plugin_message())
    key = str(lib)
    if key in _LOADED_PLUGINS:
        return lib
    init = getattr(trt, "init_libnvinfer_plugins", None)
    if init is not None:
        init(logger, "")
    registry = trt.get_plugin_registry()
    handle, why = None, ""
    try:
        # TensorRT >= 8.6: the library exports getCreators / getPluginCreators (+ setLoggerFinder).
        handle = registry.load_library(key)
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
    if handle is None:
        # A library that registers its creators with REGISTER_TENSORRT_PLUGIN (static initializers) only needs dlopen.
        import ctypes  # noqa: PLC0415
        try:
            handle = ctypes.CDLL(key, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        except OSError as e:
            raise RuntimeError(f"could not load the TensorRT plugin library {key}: {e}"
                               f"{' (registry: ' + why + ')' if why else ''}. It must be built against the "
                               f"TensorRT version installed here ({getattr(trt, '__version__', '?')}) and its CUDA; "
                               f"rebuild it: {PLUGIN_BUILD_COMMAND}") from e
    if required_op:
        names = registered_creator_names(trt)
        if names and required_op not in names:
            raise RuntimeError(f"{key} loaded but registers no {required_op!r} plugin creator (registered: "
                               f"{', '.join(sorted(names)) or 'none'}); rebuild it from plugins_trt/: "
                               f"{PLUGIN_BUILD_COMMAND}")
    _LOADED_PLUGINS[key] = handle
    return lib


# ================================================================================================================
# Optimization profile (pure Python)
# ================================================================================================================
Shape = tuple[int, ...]


class ProfileShape(NamedTuple):
    min: Shape
    opt: Shape
    max: Shape


@dataclasses.dataclass(frozen=True)
class DimRange:
    """``min <= opt <= max`` for one dimension (a batch size, a token count)."""
    min: int
    opt: int
    max: int

    def __post_init__(self):
        for v in (self.min, self.opt, self.max):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"range values must be integers, got {self.min!r}:{self.opt!r}:{self.max!r}")
        if self.min < 0:
            raise ValueError(f"range {self} has a negative minimum")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"range {self} must have min <= opt <= max "
                             f"(got min {self.min}, opt {self.opt}, max {self.max})")

    @classmethod
    def parse(cls, text: str | int, what: str = "range") -> "DimRange":
        """``"N"`` (fixed), ``"MIN:MAX"`` (opt = max) or ``"MIN:OPT:MAX"``."""
        if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
            return cls(int(text), int(text), int(text))
        parts = str(text).strip().split(":")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{what} {text!r} is not N, MIN:MAX or MIN:OPT:MAX with integers (e.g. 1:128:512)") \
                from None
        if len(vals) == 1:
            vals = vals * 3
        elif len(vals) == 2:
            vals = [vals[0], vals[1], vals[1]]
        elif len(vals) != 3:
            raise ValueError(f"{what} {text!r} has {len(vals)} parts; use N, MIN:MAX or MIN:OPT:MAX")
        try:
            return cls(*vals)
        except ValueError as e:
            raise ValueError(f"{what} {text!r}: {e}") from None

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclasses.dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str                          # numpy dtype name ("int64", "float16", ...)
    dims: tuple[int | str | None, ...]  # int: static; str: symbolic (dim_param); None: unknown

    @property
    def rank(self) -> int:
        return len(self.dims)


def read_onnx_inputs(onnx_path: str | os.PathLike) -> list[GraphInput]:
    """The real (non-initializer) inputs of an ONNX model, without loading external weights."""
    import onnx  # noqa: PLC0415
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {str(path)!r}")
    model = onnx.load(str(path), load_external_data=False)
    return graph_inputs(model)


def graph_inputs(model) -> list[GraphInput]:
    from onnx import helper  # noqa: PLC0415
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        except Exception:  # noqa: BLE001 -- bfloat16 / float8 have no numpy dtype
            dtype = str(helper.tensor_dtype_to_string(tt.elem_type)).replace("TensorProto.", "").lower()
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(str(d.dim_param))
            else:
                dims.append(None)
        out.append(GraphInput(vi.name, dtype, tuple(dims)))
    return out


def onnx_uses_op(model_or_path, op_type: str = ROCKET_OP) -> bool:
    """Whether the ONNX graph (subgraphs and local functions included) has a node of ``op_type``."""
    import onnx  # noqa: PLC0415
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = onnx.load(str(model_or_path), load_external_data=False)

    def walk(graph) -> bool:
        for node in graph.node:
            if node.op_type == op_type:
                return True
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH and walk(attr.g):
                    return True
                if attr.type == onnx.AttributeProto.GRAPHS and any(walk(g) for g in attr.graphs):
                    return True
        return False

    return walk(model.graph) or any(n.op_type == op_type for f in model.functions for n in f.node)


def onnx_has_fp16(model_or_path) -> bool:
    import onnx  # noqa: PLC0415
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = onnx.load(str(model_or_path), load_external_data=False)
    fp16 = onnx.TensorProto.FLOAT16
    vis = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    return any(v.type.tensor_type.elem_type == fp16 for v in vis) or \
        any(t.data_type == fp16 for t in model.graph.initializer)


@dataclasses.dataclass(frozen=True)
class ShapeRanges:
    """The shapes one TensorRT optimization profile covers.

    * ``batch``: batch sizes; ``seq``: new tokens per call (prompt chunk on prefill, 1 on decode).
    * ``max_context``: decoders only -- the longest past + new tokens a call may see (default ``seq.max``). The past
      KV length ranges over ``0 .. max_context - seq.min`` (0 = empty cache, the first call).
    * ``past_opt``: the past length TensorRT tunes for (default: half the context, capped at the past maximum).
    * ``overrides``: ``{input name: (min shape, opt shape, max shape)}`` used verbatim, for inputs that are not part
      of the LLM I/O convention.

    TensorRT evaluates the graph's shape relations at each profile corner, so the attention mask (``past + seq``
    long) is set to exactly ``past + seq`` at min, opt and max: its max is ``max_context - seq.min + seq.max``. The
    runtime (:class:`TrtEngine`) enforces ``past + seq <= max_context`` itself.
    """
    batch: DimRange = DimRange(1, 1, 1)
    seq: DimRange = DimRange(1, 128, 512)
    max_context: int | None = None
    past_opt: int | None = None
    overrides: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] = \
        dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.batch.min < 1:
            raise ValueError(f"batch range {self.batch}: the minimum batch size must be >= 1")
        if self.seq.min < 1:
            raise ValueError(f"sequence range {self.seq}: the minimum number of new tokens must be >= 1")
        if self.max_context is not None:
            if isinstance(self.max_context, bool) or not isinstance(self.max_context, (int, np.integer)):
                raise ValueError(f"max context must be an integer, got {self.max_context!r}")
            if self.max_context < self.seq.max:
                raise ValueError(f"max context {self.max_context} is shorter than the longest sequence "
                                 f"{self.seq.max} (--seq max); raise the max context or lower --seq")
        if self.past_opt is not None:
            past_max = self.context - self.seq.min
            if isinstance(self.past_opt, bool) or not isinstance(self.past_opt, (int, np.integer)) \
                    or not 0 <= self.past_opt <= past_max:
                raise ValueError(f"past opt {self.past_opt} must be in [0, {past_max}] "
                                 f"(max context {self.context} - seq min {self.seq.min})")
        for name, shapes in self.overrides.items():
            if len(shapes) != 3:
                raise ValueError(f"override for {name!r} must be (min shape, opt shape, max shape)")
            lo, op, hi = (tuple(int(v) for v in s) for s in shapes)
            if not len(lo) == len(op) == len(hi):
                raise ValueError(f"override for {name!r}: min/opt/max shapes must have the same rank")
            if any(not (a <= b <= c) or a < 0 for a, b, c in zip(lo, op, hi)):
                raise ValueError(f"override for {name!r}: every dim needs 0 <= min <= opt <= max, "
                                 f"got {lo} / {op} / {hi}")

    @classmethod
    def parse(cls, batch: str | int = "1", seq: str | int = "1:128:512", max_context: int | None = None,
              past_opt: int | None = None, overrides=None) -> "ShapeRanges":
        return cls(DimRange.parse(batch, "batch range"), DimRange.parse(seq, "sequence range"),
                   max_context, past_opt, dict(overrides or {}))

    @property
    def context(self) -> int:
        return int(self.max_context) if self.max_context is not None else self.seq.max

    @property
    def past(self) -> DimRange:
        hi = self.context - self.seq.min
        opt = self.past_opt if self.past_opt is not None else min(hi, self.context // 2)
        return DimRange(0, opt, hi)

    @property
    def total(self) -> DimRange:
        """Attention-mask length of a decoder (past + new), consistent at every profile corner."""
        p = self.past
        return DimRange(p.min + self.seq.min, p.opt + self.seq.opt, p.max + self.seq.max)

    def as_dict(self) -> dict:
        return {"batch": str(self.batch), "seq": str(self.seq), "max_context": self.context,
                "past": str(self.past), "overrides": {k: [list(s) for s in v] for k, v in self.overrides.items()}}

    # -----------------------------------------------------------------------------------------------------------
    def profile(self, inputs: Iterable[GraphInput] | str | os.PathLike) -> dict[str, ProfileShape]:
        """min / opt / max shapes for every input of the graph (a path is read with :func:`read_onnx_inputs`)."""
        if isinstance(inputs, (str, os.PathLike)):
            inputs = read_onnx_inputs(inputs)
        inputs = list(inputs)
        unknown = set(self.overrides) - {i.name for i in inputs}
        if unknown:
            raise ValueError(f"overrides name inputs the graph does not have: {', '.join(sorted(unknown))} "
                             f"(graph inputs: {', '.join(i.name for i in inputs)})")
        decoder = any(_PAST_RE.match(i.name) for i in inputs)
        b, s = self.batch, self.seq
        t = self.total if decoder else s
        out: dict[str, ProfileShape] = {}
        for inp in inputs:
            if inp.name in self.overrides:
                lo, op, hi = (tuple(int(v) for v in x) for x in self.overrides[inp.name])
                if len(lo) != inp.rank:
                    raise ValueError(f"override for {inp.name!r} has rank {len(lo)}, the graph input has rank "
                                     f"{inp.rank} ({_fmt_dims(inp.dims)})")
                shape = ProfileShape(lo, op, hi)
            elif _PAST_RE.match(inp.name):
                if inp.rank != 4:
                    raise ValueError(f"{inp.name} has rank {inp.rank} ({_fmt_dims(inp.dims)}); the KV-cache inputs "
                                     f"must be [batch, kv_heads, past, head_dim]")
                heads, head_dim = inp.dims[1], inp.dims[3]
                for label, d in (("kv_heads", heads), ("head_dim", head_dim)):
                    if not isinstance(d, int) or d <= 0:
                        raise ValueError(f"{inp.name} has a dynamic {label} dimension ({d!r}); re-export with static "
                                         f"head dims or give its shapes in overrides")
                p = self.past
                shape = ProfileShape((b.min, heads, p.min, head_dim), (b.opt, heads, p.opt, head_dim),
                                     (b.max, heads, p.max, head_dim))
            elif inp.name == "attention_mask":
                _need_rank(inp, 2, "[batch, past + seq]" if decoder else "[batch, seq]")
                shape = ProfileShape((b.min, t.min), (b.opt, t.opt), (b.max, t.max))
            elif inp.name in _TOKEN_INPUTS:
                _need_rank(inp, 2, "[batch, seq]")
                shape = ProfileShape((b.min, s.min), (b.opt, s.opt), (b.max, s.max))
            elif inp.dims and all(isinstance(d, int) for d in inp.dims):
                fixed = tuple(int(d) for d in inp.dims)
                shape = ProfileShape(fixed, fixed, fixed)
            else:
                raise ValueError(f"cannot choose shapes for input {inp.name!r} {_fmt_dims(inp.dims)}: it is not one "
                                 f"of input_ids / attention_mask / position_ids / token_type_ids / "
                                 f"past_key_values.N.key|value and has dynamic dims; give its (min, opt, max) "
                                 f"shapes in overrides")
            _check_static(inp, shape)
            out[inp.name] = shape
        return out


def _fmt_dims(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _need_rank(inp: GraphInput, rank: int, layout: str) -> None:
    if inp.rank != rank:
        raise ValueError(f"{inp.name} has rank {inp.rank} ({_fmt_dims(inp.dims)}); expected {layout}")


_DIM_LABEL = {0: "batch"}


def _check_static(inp: GraphInput, shape: ProfileShape) -> None:
    """A static graph dimension must equal the profile's min = opt = max there."""
    for i, d in enumerate(inp.dims):
        if isinstance(d, int):
            got = {shape.min[i], shape.opt[i], shape.max[i]}
            if got != {d}:
                lo, hi = min(got), max(got)
                what = _DIM_LABEL.get(i, f"dim {i}")
                raise ValueError(f"{inp.name} has a fixed {what} of {d} in the ONNX graph {_fmt_dims(inp.dims)}, but "
                                 f"the requested ranges need {lo}..{hi} there; re-export with dynamic axes or build "
                                 f"with that {what} fixed to {d}")


def format_profile(profile: Mapping[str, ProfileShape]) -> str:
    """A fixed-width table of the profile (for the CLI and logs)."""
    rows = [("input", "min", "opt", "max")] + [
        (n, "x".join(map(str, p.min)), "x".join(map(str, p.opt)), "x".join(map(str, p.max))) for n, p in profile.items()]
    w = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join(r[c].ljust(w[c]) for c in range(4)).rstrip() for r in rows)


# ================================================================================================================
# Small host helpers (pure; used by the builder and the engine)
# ================================================================================================================
def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def format_parser_errors(errors: Iterable[Any]) -> str:
    """One line per ONNX parser error with node index, name and operator (TensorRT >= 10 errors carry them)."""
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
        if op == ROCKET_OP or ROCKET_OP in desc:
            hint = f" -- is the plugin library loaded? ({PLUGIN_BUILD_COMMAND}, or set ${PLUGIN_ENV})"
        lines.append(f"  [{i}] {' '.join(where) or 'graph'}: {desc}{' [' + code + ']' if code else ''}{hint}")
    return "\n".join(lines)


def position_ids_from_mask(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Positions of the last ``seq`` tokens from a left- or right-padded mask ``[batch, past + seq]``
    (padding positions get 1, as transformers does)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    pos = np.where(mask == 0, 1, pos)
    return np.ascontiguousarray(pos[:, mask.shape[1] - seq:], dtype=np.int64)


def check_profile_shapes(shapes: Mapping[str, Sequence[int]], profile: Mapping[str, ProfileShape],
                         max_context: int | None = None, decoder: bool = True) -> None:
    """Raise ``ValueError`` naming the limit when a call's shapes fall outside the engine's profile."""
    problems: list[str] = []
    for name, shape in shapes.items():
        if name not in profile:
            continue
        lo, _, hi = profile[name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(lo):
            problems.append(f"{name} has rank {len(shape)}, the engine expects rank {len(lo)}")
            continue
        for i, (d, a, b) in enumerate(zip(shape, lo, hi)):
            if a <= d <= b:
                continue
            side = "more" if d > b else "fewer"
            if i == 0:
                msg = f"batch size {d} is outside the engine's range [{a}, {b}] (--batch)"
            elif name == "attention_mask" and decoder:
                msg = (f"a context of {d} tokens (past + new) is {'longer' if d > b else 'shorter'} than the engine "
                       f"allows [{a}, {b}] (--max-context)")
            elif name in _TOKEN_INPUTS or name == "attention_mask":
                msg = f"{d} new tokens per call is outside the engine's range [{a}, {b}] (--seq)"
            elif _PAST_RE.match(name) and i == 2:
                msg = f"a past of {d} tokens is outside the engine's range [{a}, {b}] (--max-context)"
            else:
                msg = f"{name} dim {i} is {d}, {side} than the engine's range [{a}, {b}]"
            if msg not in problems:
                problems.append(msg)
    if max_context is not None and decoder and "attention_mask" in shapes:
        total = int(tuple(shapes["attention_mask"])[1])
        if total > max_context:
            msg = (f"a context of {total} tokens (past + new) is longer than the max the engine was built for "
                   f"({max_context}; --max-context)")
            problems.insert(0, msg)
    if problems:
        raise ValueError("input shapes outside the engine's optimization profile: " + "; ".join(problems) +
                         ". Rebuild the engine with wider ranges: rocket-deploy build MODEL.onnx --batch MIN:OPT:MAX "
                         "--seq MIN:OPT:MAX --max-context N")


_TRT_TO_TORCH_NAMES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3fn",
}


def trt_dtype_to_torch(dtype):
    """A TensorRT ``DataType`` (or its name) as a torch dtype."""
    import torch  # noqa: PLC0415
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", str(dtype))
    name = str(name).split(".")[-1].upper()
    tname = _TRT_TO_TORCH_NAMES.get(name)
    if tname is None or not hasattr(torch, tname):
        raise TypeError(f"TensorRT data type {name} has no torch equivalent here")
    return getattr(torch, tname)


def plan_metadata_path(plan_path: str | os.PathLike) -> Path:
    return Path(str(plan_path) + METADATA_SUFFIX)


def read_plan_metadata(plan_path: str | os.PathLike) -> dict:
    p = plan_metadata_path(plan_path)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ================================================================================================================
# Build
# ================================================================================================================
def _make_progress_monitor(trt):
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

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

    * one optimization profile from ``ranges`` (see :class:`ShapeRanges`), computed from the ONNX inputs;
    * a strongly typed network (TensorRT >= 10): precisions come from the graph (fp16 exports stay fp16);
    * the plugin library is loaded first (required when the graph has ``RocketSparseVMatMul`` nodes);
    * ``timing_cache``: loaded when the file exists (a mismatching one is ignored with a warning) and saved back;
    * ``workspace_gb``: the builder's workspace pool limit (None: TensorRT's default, the device memory);
    * ``builder_optimization_level``: 0 (fast build) .. 5 (slowest build, most tactics); TensorRT's default is 3.

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
    import onnx  # noqa: PLC0415
    model = onnx.load(str(onnx_path), load_external_data=False)
    profile_shapes = ranges.profile(graph_inputs(model))
    needs_plugin = onnx_uses_op(model)
    has_fp16 = onnx_has_fp16(model)
    decoder = any(_PAST_RE.match(n) for n in profile_shapes)
    del model

    trt = import_tensorrt()
    logger = get_logger(trt, verbose)
    _clear_errors(logger)
    loaded_plugin: Path | None = None
    if needs_plugin or plugin_library is not None:
        loaded_plugin = load_plugins(trt, logger, plugin_library)
    else:
        found = None
        with contextlib.suppress(PluginLibraryNotFound):
            found = find_plugin_library()
        if found is not None:
            try:
                loaded_plugin = load_plugins(trt, logger, found)
            except Exception as e:  # noqa: BLE001 -- the graph does not need it
                print(f"[build] warning: plugin library {found} not loaded ({e}); the graph does not use it",
                      file=sys.stderr)

    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if tensorrt_major(trt) < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external-data files relative to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} error(s)):\n"
                           f"{format_parser_errors(errors)}{_recent_errors(logger)}")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(workspace_gb) * (1 << 30)))
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(builder_optimization_level)
    if not strongly_typed and has_fp16:
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT < 9: weakly typed, opt in to fp16 kernels

    profile = builder.create_optimization_profile()
    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for t in net_inputs:
        if t.name not in profile_shapes:
            if any(int(d) < 0 for d in t.shape):
                raise RuntimeError(f"network input {t.name!r} (shape {tuple(t.shape)}) has no profile shapes")
            continue
        p = profile_shapes[t.name]
        profile.set_shape(t.name, p.min, p.opt, p.max)
    if config.add_optimization_profile(profile) < 0:
        raise RuntimeError(f"TensorRT rejected the optimization profile:\n{format_profile(profile_shapes)}"
                           f"{_recent_errors(logger)}")

    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, False):
            print(f"[build] warning: timing cache {cache_path} does not match this TensorRT / GPU; starting a new "
                  f"one", file=sys.stderr)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)

    monitor = _make_progress_monitor(trt) if progress else None
    if monitor is not None and hasattr(config, "progress_monitor"):
        config.progress_monitor = monitor

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path}{_recent_errors(logger)}")
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
        "strongly_typed": strongly_typed,
        "builder_optimization_level": int(builder_optimization_level),
        "workspace_gb": workspace_gb,
        "build_seconds": round(build_s, 2),
        "device": _cuda_device_name(),
    }
    atomic_write_bytes(plan_metadata_path(plan_path), json.dumps(meta, indent=2).encode())
    return plan_path


def _cuda_device_name() -> str | None:
    try:
        import torch  # noqa: PLC0415
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            return f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
    except Exception:  # noqa: BLE001
        pass
    return None


# ================================================================================================================
# Runtime
# ================================================================================================================
@dataclasses.dataclass
class TensorInfo:
    name: str
    is_input: bool
    dtype: Any                     # torch dtype
    shape: Shape                   # from the engine; -1 for dynamic dims
    profile: ProfileShape | None   # inputs only


@dataclasses.dataclass
class TrtKVCache:
    """The ``present`` state of :class:`TrtEngine`: device tensors keyed by the *past* input names."""
    tensors: dict
    length: int
    batch: int


class TrtEngine(Engine):
    """A serialized TensorRT plan behind :class:`Engine` (KV cache stays on the GPU between calls)."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, device: str | None = None,
                 plugin_library: str | os.PathLike | None = None, tokenizer=None, verbose: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no TensorRT plan at {str(self.path)!r}")
        trt = import_tensorrt()
        import torch  # noqa: PLC0415
        self._torch = torch
        self.device = self._resolve_device(device)
        self.meta = read_plan_metadata(self.path)
        self._logger = get_logger(trt, verbose)
        _clear_errors(self._logger)

        self.plugin_library: Path | None = None
        plugin_error: Exception | None = None
        try:
            if plugin_library is not None or self.meta.get("uses_plugin") or find_plugin_library() is not None:
                self.plugin_library = load_plugins(trt, self._logger, plugin_library)
        except Exception as e:  # noqa: BLE001 -- only fatal if the plan needs it (reported below)
            plugin_error = e
            if self.meta.get("uses_plugin"):
                raise

        with self._device_scope():
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise RuntimeError(self._deserialize_failure(trt, plugin_error))
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.path} (out of GPU "
                               f"memory?){_recent_errors(self._logger)}")

        self.tensors: dict[str, TensorInfo] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            prof = None
            if is_input:
                lo, op, hi = self._engine.get_tensor_profile_shape(name, 0)
                prof = ProfileShape(tuple(lo), tuple(op), tuple(hi))
            self.tensors[name] = TensorInfo(name, is_input, trt_dtype_to_torch(self._engine.get_tensor_dtype(name)),
                                            tuple(self._engine.get_tensor_shape(name)), prof)
        self.input_names = [n for n, t in self.tensors.items() if t.is_input]
        self.output_names = [n for n, t in self.tensors.items() if not t.is_input]
        self.profile = {n: self.tensors[n].profile for n in self.input_names}
        self.past_names = sorted((n for n in self.input_names if _PAST_RE.match(n)), key=_layer_key)
        self.is_decoder = bool(self.past_names) or "logits" in self.output_names
        self.max_context = self.meta.get("max_context") if self.is_decoder else None
        self._dummy = torch.empty(1, dtype=torch.uint8, device=self.device)  # address for zero-size tensors
        self.tokenizer = tokenizer if tokenizer is not None else self._find_tokenizer()

    # ---- construction helpers ---------------------------------------------------------------------------------
    def _resolve_device(self, device):
        torch = self._torch
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs a CUDA GPU visible to torch "
                               "(torch.cuda.is_available() is False); run `rocket-deploy doctor`")
        dev = torch.device(device or "cuda")
        if dev.type != "cuda":
            raise ValueError(f"TensorRT runs on CUDA devices, got {dev}")
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())

    def _device_scope(self):
        return self._torch.cuda.device(self.device)

    def _stream(self):
        return self._torch.cuda.current_stream(self.device)

    def _deserialize_failure(self, trt, plugin_error) -> str:
        msg = f"TensorRT could not deserialize {self.path}."
        built = self.meta.get("tensorrt_version")
        here = str(getattr(trt, "__version__", "?"))
        if built and built != here:
            msg += (f" It was built with TensorRT {built} and this is TensorRT {here}: plans are tied to the "
                    f"TensorRT version and GPU that built them; rebuild it here with `rocket-deploy build`.")
        else:
            msg += (" Plans only load with the TensorRT version and GPU model that built them; rebuild it here with "
                    "`rocket-deploy build`.")
        if self.plugin_library is None:
            msg += (f" No plugin library was loaded: if the plan uses {ROCKET_OP}, build it "
                    f"({PLUGIN_BUILD_COMMAND}) or set ${PLUGIN_ENV}.")
            if plugin_error is not None:
                msg += f" (plugin load error: {plugin_error})"
        return msg + _recent_errors(self._logger)

    def _find_tokenizer(self):
        dirs = [self.path.parent]
        if self.meta.get("onnx"):
            dirs.append(Path(self.meta["onnx"]).parent)
        for d in dirs:
            if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
                try:
                    from transformers import AutoTokenizer  # noqa: PLC0415
                    return AutoTokenizer.from_pretrained(str(d))
                except Exception:  # noqa: BLE001 -- generation then needs token ids
                    return None
        return None

    # ---- execution ---------------------------------------------------------------------------------------------
    def _execute(self, feeds: dict) -> dict:
        """Run the engine on device tensors ``{input name: tensor}``; returns ``{output name: tensor}``."""
        torch = self._torch
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"missing engine inputs: {', '.join(missing)} (the engine takes "
                             f"{', '.join(self.input_names)})")
        extra = [n for n in feeds if n not in self.tensors or not self.tensors[n].is_input]
        if extra:
            raise ValueError(f"unknown inputs {', '.join(extra)}; the engine takes {', '.join(self.input_names)}")
        shapes = {n: tuple(t.shape) for n, t in feeds.items()}
        check_profile_shapes(shapes, self.profile, self.max_context, self.is_decoder)
        ctx = self._context
        keep = []
        with self._device_scope():
            for name in self.input_names:
                t = feeds[name].to(device=self.device, dtype=self.tensors[name].dtype).contiguous()
                keep.append(t)
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"TensorRT rejected shape {tuple(t.shape)} for {name}"
                                     f"{_recent_errors(self._logger)}")
                ctx.set_tensor_address(name, t.data_ptr() if t.numel() else self._dummy.data_ptr())
            unresolved = ctx.infer_shapes() if hasattr(ctx, "infer_shapes") else []
            if unresolved:
                raise RuntimeError(f"TensorRT could not infer the shapes of {', '.join(unresolved)} from the inputs")
            outputs = {}
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"output {name} has an unresolved shape {shape} (data-dependent shapes are not "
                                       f"supported by this backend)")
                out = torch.empty(shape, dtype=self.tensors[name].dtype, device=self.device)
                outputs[name] = out
                ctx.set_tensor_address(name, out.data_ptr() if out.numel() else self._dummy.data_ptr())
            stream = self._stream()
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution failed{_recent_errors(self._logger)}")
            stream.synchronize()
        del keep
        return outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        dev = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feeds.items()}
        outs = self._execute(dev)
        return {n: _to_numpy(t) for n, t in outs.items()}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Any | None):
        torch = self._torch
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or mask.ndim != 2 or mask.shape[0] != ids.shape[0]:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be [batch, ...] 2-D "
                             f"arrays with the same batch")
        batch, seq = ids.shape
        # fail early, with the option to change, before anything is allocated on the GPU
        check_profile_shapes({n: s for n, s in (("input_ids", ids.shape), ("attention_mask", mask.shape))
                              if n in self.profile}, self.profile, self.max_context, self.is_decoder)
        feeds = {"input_ids": torch.from_numpy(np.ascontiguousarray(ids))}
        if not self.is_decoder:
            if "attention_mask" in self.input_names:
                feeds["attention_mask"] = torch.from_numpy(np.ascontiguousarray(mask))
            if "token_type_ids" in self.input_names:
                feeds["token_type_ids"] = torch.zeros_like(feeds["input_ids"])
            outs = self._execute(feeds)
            key = "last_hidden_state" if "last_hidden_state" in outs else self.output_names[0]
            return _to_numpy(outs[key]).astype(np.float32, copy=False), None

        past_len = mask.shape[1] - seq
        if past_len < 0:
            raise ValueError(f"attention_mask covers {mask.shape[1]} tokens, fewer than the {seq} new ones")
        if past is None:
            if past_len:
                raise ValueError(f"attention_mask covers {past_len} past tokens but no past state was given")
            for name in self.past_names:
                info = self.tensors[name]
                _, heads, _, head_dim = _static_kv_dims(info)
                feeds[name] = torch.empty((batch, heads, 0, head_dim), dtype=info.dtype, device=self.device)
        else:
            if not isinstance(past, TrtKVCache):
                raise TypeError(f"past must be the state a previous TrtEngine.forward returned, got "
                                f"{type(past).__name__}")
            if past.length != past_len or past.batch != batch:
                raise ValueError(f"past holds {past.length} tokens for batch {past.batch}, the mask implies "
                                 f"{past_len} past tokens for batch {batch}")
            feeds.update(past.tensors)
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = torch.from_numpy(np.ascontiguousarray(mask))
        if "position_ids" in self.input_names:
            feeds["position_ids"] = torch.from_numpy(position_ids_from_mask(mask, seq))
        outs = self._execute({k: v for k, v in feeds.items() if k in self.tensors})
        present = {}
        for name, t in outs.items():
            m = _PRESENT_RE.match(name)
            if m:
                present[f"past_key_values.{m.group(1)}.{m.group(2)}"] = t
        key = "logits" if "logits" in outs else self.output_names[0]
        logits = outs[key].float().cpu().numpy()
        return logits, TrtKVCache(present, past_len + seq, batch)

    def model_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        for attr in ("_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                setattr(self, attr, None)


def _layer_key(name: str):
    m = _PAST_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (1 << 30, name)


def _static_kv_dims(info: TensorInfo) -> Shape:
    shape = tuple(info.shape)
    if len(shape) != 4:
        raise RuntimeError(f"{info.name} has rank {len(shape)}; expected [batch, kv_heads, past, head_dim]")
    if shape[1] < 0 or shape[3] < 0:  # dynamic head dims: take them from the profile (min = max there)
        shape = tuple(info.profile.max) if info.profile is not None else shape
    return shape


def _to_numpy(t) -> np.ndarray:
    import torch  # noqa: PLC0415
    if t.dtype in (torch.bfloat16,) or "float8" in str(t.dtype):
        t = t.float()
    return t.detach().cpu().numpy()
