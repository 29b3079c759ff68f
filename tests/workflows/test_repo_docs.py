"""The README links the docs and lists the Makefile targets; the targets run the scripts they name with options
those scripts accept (checked with ``make -n``: nothing runs)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = ["serving", "quantization", "plugin", "tensorrt", "export", "benchmarks"]
# target -> (script or None, what the recipe must run)
TARGETS = {
    "test": (None, "-m pytest -q"),
    "test-gpu": (None, "-m pytest -q -m gpu"),
    "bench-kernels": ("bench/bench_kernels.py", "bench/bench_kernels.py"),
    "bench-export": ("bench/bench_export_ort.py", "bench/bench_export_ort.py"),
    "bench-quant": ("bench/bench_quantization.py", "bench/bench_quantization.py --profile-root"),
    "gpu-check": ("bench/gpu_check.py", "bench/gpu_check.py --out"),
    "bench-quality": ("bench/bench_quality_per_byte.py", "bench/bench_quality_per_byte.py --profile-root"),
}


def test_readme_links_every_doc():
    for d in DOCS:
        assert f"](docs/{d}.md)" in README, d
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    # the two fresh-machine commands stay first
    fresh = README.split("## Fresh machine", 1)[1].split("##", 1)[0]
    assert "make demo" in fresh and "make test" in fresh


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_make_target(target):
    want = TARGETS[target][1]
    assert f"`make {target}`" in README or f"/ `make {target}`" in README, f"README does not list make {target}"
    r = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "bin/python" in ln and ("pytest" in ln or "bench/" in ln)]
    assert lines, r.stdout
    assert lines[0].split("bin/python ", 1)[1].startswith(want), lines[0]
    if target == "test":
        # besides pytest, setup may only build the ORT custom-op library (make ort-ops)
        others = [ln for ln in r.stdout.splitlines() if "bin/python" in ln and ln not in lines]
        assert all("ort_custom_ops" in ln for ln in others), others
        assert len(lines) == 1
        assert lines[0].endswith("-m pytest -q"), "make test must stay unchanged"
    # every bench script a recipe runs exists and accepts the options the recipe passes it
    for line in lines:
        m = re.search(r"(bench/[a-z_]+\.py)", line)
        if not m:
            continue
        script = m.group(1)
        text = (ROOT / script).read_text()
        for opt in re.findall(r"(--[a-z][a-z0-9-]*)", line.split(script, 1)[1]):
            assert f'"{opt}"' in text, f"{script} has no option {opt}"
