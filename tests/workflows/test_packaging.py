"""A non-editable install ships what runs at run time: the torch extension's binding (runtime/csrc) and the CUDA
kernel sources it builds from (plugins_trt/kernels, shipped as rocket_deploy/runtime/csrc/kernels), and
runtime/kernel_ext.py finds the kernels in both the installed and the source-checkout layout. No GPU needed."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rocket_deploy.runtime import kernel_ext

ROOT = Path(__file__).resolve().parents[2]
KERNELS = sorted(p.name for p in (ROOT / "plugins_trt" / "kernels").iterdir() if p.suffix in (".cu", ".h"))
# What pyproject.toml maps into the package (package-dir) plus what the wheel metadata needs.
SOURCE_PARTS = ["pyproject.toml", "README.md", "rocket_deploy", "compress", "export", "runtime", "plugins_trt/kernels"]


def _fake_kernels(d: Path) -> Path:
    d.mkdir(parents=True)
    for name in (kernel_ext.KERNEL_SOURCE, kernel_ext.KERNEL_HEADER):
        (d / name).write_text("// test\n")
    return d


def test_kernel_lookup_in_both_layouts(tmp_path, monkeypatch):
    monkeypatch.delenv("ROCKET_KERNELS_DIR", raising=False)
    # source checkout / editable install: <root>/runtime/kernel_ext.py, <root>/plugins_trt/kernels
    assert kernel_ext.kernels_dir() == ROOT / "plugins_trt" / "kernels"
    checkout = tmp_path / "checkout"
    (checkout / "runtime").mkdir(parents=True)
    want = _fake_kernels(checkout / "plugins_trt" / "kernels")
    assert kernel_ext.kernels_dir(checkout / "runtime") == want
    # installed wheel: site-packages/rocket_deploy/runtime/kernel_ext.py, .../runtime/csrc/kernels
    runtime = tmp_path / "site-packages" / "rocket_deploy" / "runtime"
    want = _fake_kernels(runtime / "csrc" / "kernels")
    assert kernel_ext.kernels_dir(runtime) == want
    # neither: the message names where it looked and the way out
    with pytest.raises(RuntimeError, match="ROCKET_KERNELS_DIR") as e:
        kernel_ext.kernels_dir(tmp_path / "empty" / "runtime")
    assert "csrc/kernels" in str(e.value) and "plugins_trt/kernels" in str(e.value)
    monkeypatch.setenv("ROCKET_KERNELS_DIR", str(checkout / "plugins_trt" / "kernels"))
    assert kernel_ext.kernels_dir(runtime) == checkout / "plugins_trt" / "kernels"


def test_wheel_ships_runtime_sources(tmp_path):
    """Build the wheel from a clean copy of the sources (no stale build/ folder) and look inside (about 2 s)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    for part in SOURCE_PARTS:
        p = ROOT / part
        if p.is_dir():
            shutil.copytree(p, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build*"))
        else:
            (src / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, src / part)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "whl"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp_path / "whl").glob("rocket_deploy-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert "rocket_deploy/runtime/csrc/rocket_ops.cpp" in names
    for k in KERNELS:
        assert f"rocket_deploy/runtime/csrc/kernels/{k}" in names, sorted(n for n in names if "csrc" in n)
    assert "rocket_deploy/runtime/kernel_ext.py" in names and "rocket_deploy/compress/pipeline.py" in names
    # the installed layout resolves to the shipped files, identical to the checkout's
    runtime = tmp_path / "site" / "rocket_deploy" / "runtime"
    kdir = kernel_ext.kernels_dir(runtime)
    assert kdir == runtime / "csrc" / "kernels"
    for k in KERNELS:
        assert (kdir / k).read_bytes() == (ROOT / "plugins_trt" / "kernels" / k).read_bytes()
