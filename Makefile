# make setup       everything ready on a fresh machine (idempotent; a second run takes seconds)
# make test        setup, then the import layering, the linter and the test suite
# make demo        setup, then the two-frame demo on example_data/ (headless without a display)
# make cuda-check  compile every csrc/*/*.cu with nvcc (syntax and device code; no GPU needed)
# make gpu-test    on a machine with a GPU: every CUDA path against its CPU path (says so and exits 0 without one)
# make bench       run the benchmarks in benchmarks/
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXT_SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \)) setup.py
PYTEST_FLAGS ?= -q

.PHONY: setup system-packages test demo cuda-check gpu-test bench clean

setup: system-packages $(VENV)/.ext-built

system-packages:
	@./resources/system_packages.sh

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.requirements: resources/requirements.txt | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -r resources/requirements.txt
	touch $@

# The editable install ("compat" mode: a .pth file with the repository root) puts the repository
# on the venv's path, so `python benchmarks/x.py` and imports from any folder work; it also builds
# nnrt_ext in place. Source edits later rebuild incrementally with ninja through build_ext.
# Builds are serialised with flock so that parallel `make` calls never share a half-built tree.
$(VENV)/.editable: $(VENV)/.requirements setup.py pyproject.toml
	@mkdir -p build
	flock build/.lock env MAX_JOBS=2 $(PY) -m pip install -q --disable-pip-version-check --no-deps \
	  --no-build-isolation --config-settings editable_mode=compat -e .
	touch $@

$(VENV)/.ext-built: $(VENV)/.editable $(EXT_SOURCES)
	flock build/.lock env MAX_JOBS=2 $(PY) setup.py -q build_ext --inplace
	touch $@

# The layering (import-linter's "layers" contract in pyproject.toml) and the linter (ruff, a
# small rule set, also in pyproject.toml) run before the tests, so an upward import fails CI.
test: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check --no-cache .
	$(PY) -m pytest -p no:dash $(PYTEST_FLAGS) tests

demo: setup
	$(PY) example_viz.py $(DEMO_ARGS)

cuda-check: setup
	$(PY) resources/cuda_check.py

gpu-test: setup
	$(PY) resources/gpu_test.py

bench: setup
	$(PY) benchmarks/bench_graph.py
	$(PY) benchmarks/bench_solver.py
	$(PY) benchmarks/bench_hashgrid.py
	$(PY) benchmarks/bench_network.py
	$(PY) benchmarks/bench_sequence.py
	$(PY) benchmarks/bench_fusion.py
	$(PY) benchmarks/bench_dis_pair.py
	$(PY) benchmarks/bench_hidden.py
	$(PY) benchmarks/bench_residual_sequence.py

clean:
	rm -rf build *.egg-info nnrt_ext*.so $(VENV)/.ext-built $(VENV)/.editable
