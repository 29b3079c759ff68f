"""The CUDA sparse V kernels, run on the CPU under emulation with ASan + UBSan (plugins_trt/tests/emu).

The kernel source is compiled by g++ with a mechanical rewrite of its launches and __shared__ declarations only; every
CUDA thread is a fiber, barriers / shuffles / WMMA are emulated collectives with divergence and deadlock checks, shared
memory starts as NaN bytes. Each group compares every kernel path with a float64 reference (see emu_driver.cpp).
Needs g++ and the CUDA headers (no GPU); skipped with the reason otherwise. The build is cached by the hash of its
inputs under <tmp>/rocket-kernel-emu (ROCKET_EMU_CACHE overrides), so only a kernel change recompiles (~1-2 min).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EMU = ROOT / "plugins_trt" / "tests" / "emu"
KERNEL = ROOT / "plugins_trt" / "kernels" / "rocketSparseVKernel.cu"
GROUP_TIMEOUT_S = 600


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"rocket_emu_{name}", EMU / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


emu_build = _load("emu_build")
emu_source = _load("emu_source")


def _build_or_skip(**kw) -> Path:
    try:
        return emu_build.build(log=lambda *_: None, **kw)
    except emu_build.EmuUnavailable as e:
        pytest.skip(f"kernel emulation needs g++ and the CUDA headers: {e}")


@pytest.fixture(scope="module")
def emu_exe() -> Path:
    return _build_or_skip()


@pytest.mark.parametrize("group", ["helpers", "decode", "prefill", "edge", "nonfinite", "fallback"])
def test_kernel_group_under_asan(emu_exe, group):
    res = emu_build.run(emu_exe, group, timeout=GROUP_TIMEOUT_S)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "ALL PASSED" in res.stdout, f"emulated kernels, group {group}:\n{out[-8000:]}"
    assert "ERROR: AddressSanitizer" not in out and "runtime error" not in out, out[-8000:]


def test_harness_catches_a_planted_race(tmp_path):
    """The WMMA epilogue without its __syncwarp (lanes read the staging tile before the others stored it) fails."""
    src = KERNEL.read_text()
    sync = ("            wmma::store_matrix_sync(st, acc[i][j], kStageLd, wmma::mem_row_major);\n"
            "            __syncwarp();\n")
    assert src.count(sync) == 1, "the planted bug no longer applies: update this test"
    planted = tmp_path / KERNEL.name
    planted.write_text(src.replace(sync, sync.splitlines(keepends=True)[0]))
    (tmp_path / "rocketSparseVKernel.h").write_text((KERNEL.parent / "rocketSparseVKernel.h").read_text())
    exe = _build_or_skip(kernel=planted, sanitize=False)  # a fast build: the check is numeric
    res = emu_build.run(exe, "prefill", timeout=GROUP_TIMEOUT_S)
    assert res.returncode != 0 and "wrong outputs" in res.stdout, res.stdout[-3000:]


def test_source_rewrite_is_mechanical_and_refuses_unknown_constructs():
    text, counts = emu_source.transform(KERNEL.read_text())
    assert counts["launches"] >= 6 and counts["static_shared"] >= 4 and counts["dynamic_shared"] >= 1
    assert "<<<" not in text and "__shared__" not in "\n".join(
        ln for ln in text.splitlines() if not ln.lstrip().startswith(("//", "*")))
    # Lines are preserved (diagnostics point at the real source).
    assert text.count("\n") == KERNEL.read_text().count("\n")
    bad = "__global__ void k(int* p) {}\nvoid f() { k<<<1, 32, 0, 0>>>(nullptr); }\n"
    with pytest.raises(ValueError, match="__launch_bounds__"):
        emu_source.transform(bad)
    with pytest.raises(ValueError, match="does not rewrite"):
        emu_source.transform("__global__ void __launch_bounds__(32) k() { __shared__ float x; }\n")


def test_build_is_cached(emu_exe):
    again = emu_build.build(log=lambda *_: pytest.fail("rebuilt although nothing changed"))
    assert again == emu_exe and os.access(again, os.X_OK)
