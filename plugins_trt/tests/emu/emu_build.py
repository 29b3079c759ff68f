"""Build (cached) and run the CPU emulation test of the sparse V kernels.

    python plugins_trt/tests/emu/emu_build.py [--kernel PATH.cu] [--no-sanitize] [GROUP ...]

Groups: helpers decode prefill edge nonfinite fallback all (default: all). The build rewrites the kernel source
mechanically (emu_source.py), compiles it with emu_driver.cpp under g++ -fsanitize=address,undefined and caches the
binary under $ROCKET_EMU_CACHE (default: <tmp>/rocket-kernel-emu/<hash of every input and flag>), so an unchanged
kernel is compiled once. Needs g++ and the CUDA headers (cuda_fp16.h & co. from $CUDA_HOME/include or
/usr/local/cuda/include); no GPU, no CUDA runtime library.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
KERNEL = REPO / "plugins_trt" / "kernels" / "rocketSparseVKernel.cu"
EMU_FILES = [HERE / "emu_cuda.h", HERE / "include" / "mma.h", HERE / "emu_driver.cpp", HERE / "emu_source.py"]
GROUPS = ("helpers", "decode", "prefill", "edge", "nonfinite", "fallback", "all")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
BASE_FLAGS = ["-std=c++17", "-O1", "-g1", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
              "-Wno-unused-parameter"]
# Fibers switch stacks: ASan's fake stacks (use-after-return) are off; everything else stays on.
RUN_ENV = {"ASAN_OPTIONS": "detect_stack_use_after_return=0:detect_leaks=1:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}

sys.path.insert(0, str(HERE))
import emu_source  # noqa: E402


class EmuUnavailable(RuntimeError):
    """g++ or the CUDA headers are missing (the test skips)."""


def find_cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or not shutil.which(cxx):
        raise EmuUnavailable("g++ not found (set CXX)")
    return cxx


def find_cuda_include() -> Path:
    cands = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    cands.append(Path("/usr/local/cuda/include"))
    for d in cands:
        if (d / "cuda_fp16.h").is_file() and (d / "cuda_runtime.h").is_file():
            return d
    raise EmuUnavailable(f"CUDA headers (cuda_fp16.h, cuda_runtime.h) not found in {', '.join(map(str, cands))}")


def build(kernel: Path = KERNEL, sanitize: bool = True, cache: Path | None = None, log=print) -> Path:
    """Path of the emulation binary for `kernel`, compiled unless a build of the same inputs is cached."""
    cxx, cuda_inc = find_cxx(), find_cuda_include()
    kernel = Path(kernel).resolve()
    header = kernel.parent / "rocketSparseVKernel.h"
    flags = BASE_FLAGS + (SANITIZE if sanitize else [])
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    h = hashlib.sha256()
    for f in [kernel, header, *EMU_FILES]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(" ".join(flags + version + [str(cuda_inc)]).encode())
    root = Path(cache or os.environ.get("ROCKET_EMU_CACHE") or Path(tempfile.gettempdir()) / "rocket-kernel-emu")
    out = root / h.hexdigest()[:20]
    exe = out / "emu_driver"
    out.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # one build at a time (parallel test runs wait)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.is_file():
            return exe
        text, counts = emu_source.transform(kernel.read_text())
        inc = out / "kernel_emu.inc"
        inc.write_text(f'#line 1 "{kernel}"\n' + text)
        log(f"emu: rewrote {kernel.name} ({', '.join(f'{k} {v}' for k, v in counts.items())}); compiling ...")
        tmp = out / "emu_driver.part"
        cmd = [cxx, *flags, f'-DROCKET_EMU_KERNEL_INC="{inc}"', f"-I{HERE / 'include'}", f"-I{HERE}",
               f"-I{kernel.parent}", f"-I{cuda_inc}", str(HERE / "emu_driver.cpp"), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"emulation build failed ({' '.join(cmd)}):\n{res.stderr[-6000:]}")
        warnings = [ln for ln in res.stderr.splitlines() if "warning" in ln]
        if warnings:
            log("emu: compiler warnings:\n" + "\n".join(warnings[:20]))
        os.replace(tmp, exe)
    return exe


def run(exe: Path, group: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), group], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **RUN_ENV})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("groups", nargs="*", default=["all"], choices=GROUPS, metavar="GROUP")
    ap.add_argument("--kernel", type=Path, default=KERNEL, help="kernel source (default: the repository's)")
    ap.add_argument("--no-sanitize", action="store_true", help="build without ASan / UBSan (faster, fewer checks)")
    ap.add_argument("--cache", type=Path, default=None, help="build cache folder")
    args = ap.parse_args(argv)
    try:
        exe = build(args.kernel, sanitize=not args.no_sanitize, cache=args.cache)
    except EmuUnavailable as e:
        print(f"emu: cannot build: {e}", file=sys.stderr)
        return 2
    status = 0
    for g in args.groups:
        res = run(exe, g)
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr)
        status = status or res.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
