"""The TensorRT plugin library ``librocket_trt_plugins.so`` (built from ``plugins_trt/``): where it is, and loading it
into TensorRT's plugin registry. It implements the contract's op (:data:`rocket_deploy.onnx_contract.PLUGIN_NAME`,
namespace / version from the same module), the node the ONNX parser maps to the plugin creator by op type.

Search order of :func:`find_plugin_library`: ``$ROCKET_TRT_PLUGIN`` (must exist when set), the source checkout's
``plugins_trt/build*/`` (and one folder deeper, newest first), then next to the installed package.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from rocket_deploy.onnx_contract import PLUGIN_NAME

PLUGIN_ENV = "ROCKET_TRT_PLUGIN"
PLUGIN_FILENAME = "librocket_trt_plugins.so"
PLUGIN_BUILD_COMMAND = ("cmake -S plugins_trt -B plugins_trt/build -DTensorRT_ROOT=/path/to/TensorRT "
                        "&& cmake --build plugins_trt/build -j")

# Source checkout layout: <root>/runtime/trt/plugins.py and <root>/plugins_trt/build*/librocket_trt_plugins.so.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent      # the runtime package (rocket_deploy.runtime)
_SOURCE_ROOT = _PACKAGE_DIR.parent

_LOADED_PLUGINS: dict[str, Any] = {}


class PluginLibraryNotFound(FileNotFoundError):
    """The plugin library could not be found (the message says how to build it)."""


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
    return (f"the TensorRT plugin library {PLUGIN_FILENAME} (it implements the {PLUGIN_NAME} op) was not found.\n"
            f"Build it from the source checkout:\n  {PLUGIN_BUILD_COMMAND}\n"
            f"or point ${PLUGIN_ENV} at the built library. Looked in:\n  {looked}\n"
            f"  (plugins_trt/build*/{PLUGIN_FILENAME} under {_SOURCE_ROOT})")


def registered_creator_names(trt) -> set[str]:
    """Names of the plugin creators in TensorRT's global registry (``all_creators``: V2 and V3 creators)."""
    return {str(c.name) for c in (trt.get_plugin_registry().all_creators or []) if getattr(c, "name", None)}


def load_plugins(trt, logger, path: str | os.PathLike | None = None, required_op: str | None = PLUGIN_NAME) -> Path:
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
    trt.init_libnvinfer_plugins(logger, "")
    registry = trt.get_plugin_registry()
    handle, why = None, ""
    try:
        # The library exports getCreators / getPluginCreators (+ setLoggerFinder) for the registry.
        handle = registry.load_library(key)
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
    if handle is None:
        # A library that registers its creators with static initializers only needs dlopen.
        import ctypes  # noqa: PLC0415
        try:
            handle = ctypes.CDLL(key, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        except OSError as e:
            raise RuntimeError(f"could not load the TensorRT plugin library {key}: {e}"
                               f"{' (registry: ' + why + ')' if why else ''}. It must be built against the "
                               f"TensorRT version installed here ({getattr(trt, '__version__', '?')}) and its CUDA; "
                               f"rebuild it: {PLUGIN_BUILD_COMMAND}") from e
        # Load-time registration is opt-in (ROCKET_STATIC_REGISTRATION): a plain dlopen registers through the
        # library's exported initRocketTrtPlugins(logger, namespace), as initLibNvInferPlugins does for NVIDIA's.
        init = getattr(handle, "initRocketTrtPlugins", None)
        if init is not None:
            init(None, b"rocket")
    if required_op:
        names = registered_creator_names(trt)
        if required_op not in names:
            raise RuntimeError(f"{key} loaded but registers no {required_op!r} plugin creator (registered: "
                               f"{', '.join(sorted(names)) or 'none'}); rebuild it from plugins_trt/: "
                               f"{PLUGIN_BUILD_COMMAND}")
    _LOADED_PLUGINS[key] = handle
    return lib
