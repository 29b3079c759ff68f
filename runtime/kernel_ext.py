"""Build and load the torch extension of the ROCKET sparse V kernels (``rocket_ops``).

The CUDA sources are the TensorRT plugin's ``plugins_trt/kernels/rocketSparseVKernel.{cu,h}``: ``$ROCKET_KERNELS_DIR``
if set, else ``csrc/kernels/`` next to this file in an installed wheel (pyproject.toml maps ``plugins_trt/kernels`` to
the data package ``rocket_deploy.runtime.csrc.kernels``; git holds one copy), else ``../plugins_trt/kernels`` of the
source checkout (an editable install, where ``runtime/`` is ``rocket_deploy.runtime``). The binding is
``csrc/rocket_ops.cpp`` next to this file. The build runs once, with
``torch.utils.cpp_extension.load``, into ``$ROCKET_EXT_DIR`` (default ``~/.cache/rocket_deploy/torch_ext/<key>``,
where the key covers the sources, torch and CUDA versions), and is reused afterwards.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

EXT_NAME = "rocket_ops"
KERNEL_SOURCE = "rocketSparseVKernel.cu"
KERNEL_HEADER = "rocketSparseVKernel.h"
_HERE = Path(__file__).resolve().parent


def kernel_dir_candidates(here: Path | None = None) -> list[Path]:
    """Where the kernel sources are looked for, in order: the installed package's ``csrc/kernels`` (wheel), then the
    source checkout's ``plugins_trt/kernels`` (editable install). ``here`` is this module's folder."""
    here = _HERE if here is None else here
    return [here / "csrc" / "kernels", here.parent / "plugins_trt" / "kernels"]


def kernels_dir(here: Path | None = None) -> Path:
    """Folder holding rocketSparseVKernel.cu/.h: ``$ROCKET_KERNELS_DIR``, else the first of
    :func:`kernel_dir_candidates` that has both files."""
    env = os.environ.get("ROCKET_KERNELS_DIR")
    if env:
        d = Path(env).expanduser()
        if not (d / KERNEL_SOURCE).is_file():
            raise RuntimeError(f"ROCKET_KERNELS_DIR={env} has no {KERNEL_SOURCE}")
        return d
    cands = kernel_dir_candidates(here)
    for d in cands:
        if (d / KERNEL_SOURCE).is_file() and (d / KERNEL_HEADER).is_file():
            return d
    looked = ", ".join(str(d) for d in cands)
    raise RuntimeError(f"the CUDA kernel sources ({KERNEL_SOURCE}, {KERNEL_HEADER}) are in none of {looked}; "
                       f"reinstall rocket-deploy or set ROCKET_KERNELS_DIR to a checkout's plugins_trt/kernels")


def binding_source() -> Path:
    return _HERE / "csrc" / "rocket_ops.cpp"


def find_nvcc() -> str | None:
    """The nvcc the extension build runs -- the project's one nvcc finder (``rocket-deploy doctor`` reports this one).

    ``torch.utils.cpp_extension`` compiles with ``$PYTORCH_NVCC`` when set, else ``<CUDA_HOME>/bin/nvcc`` with the
    CUDA_HOME torch found at import ($CUDA_HOME / $CUDA_PATH, the nvcc on PATH, /usr/local/cuda); the same order
    is looked at here, read now (so a $CUDA_HOME set after torch was imported still counts)."""
    env_nvcc = os.environ.get("PYTORCH_NVCC")
    if env_nvcc and Path(env_nvcc).is_file():
        return env_nvcc
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 -- no torch, or a broken one: look without it
        CUDA_HOME = None
    for root in (CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    p = shutil.which("nvcc")
    if p:
        return p
    cand = Path("/usr/local/cuda/bin/nvcc")
    return str(cand) if cand.is_file() else None


def check_prerequisites() -> None:
    """Raise RuntimeError saying what is missing to build / run the extension here."""
    import torch
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build; the rocket CUDA kernels need a CUDA "
                           f"build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu12x)")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU is visible to torch (torch.cuda.is_available() is False); check the driver "
                           "and CUDA_VISIBLE_DEVICES")
    if find_nvcc() is None:
        raise RuntimeError(f"nvcc was not found (torch CUDA {torch.version.cuda}); install the CUDA toolkit and put "
                           f"its bin/ on PATH or set CUDA_HOME, to build the rocket kernels")


def _build_key(sources: list[Path]) -> str:
    import torch
    h = hashlib.sha256()
    for s in sources:
        h.update(s.read_bytes())
    h.update(f"{torch.__version__}|{torch.version.cuda}".encode())
    try:
        h.update(("|".join(f"{torch.cuda.get_device_capability(i)}" for i in range(torch.cuda.device_count()))).encode())
    except Exception:  # noqa: BLE001
        pass
    return h.hexdigest()[:16]


def build_dir(key: str) -> Path:
    env = os.environ.get("ROCKET_EXT_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "rocket_deploy" / "torch_ext"
    d = root / key
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.lru_cache(maxsize=1)
def load_extension(verbose: bool = False):
    """Build (first call) and import the extension; raises RuntimeError with the reason when it cannot."""
    check_prerequisites()
    kdir = kernels_dir()
    sources = [binding_source(), kdir / KERNEL_SOURCE]
    if not sources[0].is_file():
        raise RuntimeError(f"the extension binding {sources[0]} is missing")
    key = _build_key(sources + [kdir / KERNEL_HEADER])
    from torch.utils.cpp_extension import load
    try:
        return load(name=EXT_NAME, sources=[str(s) for s in sources], extra_include_paths=[str(kdir)],
                    extra_cflags=["-O3", "-std=c++17"],
                    extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr"],
                    build_directory=str(build_dir(key)), verbose=verbose)
    except Exception as e:  # noqa: BLE001 -- compiler output is in the message
        raise RuntimeError(f"building the rocket CUDA extension failed: {e}") from e
