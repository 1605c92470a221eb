# fastlm: `make test` and `make bench` each do all set-up on a fresh Linux machine with Python 3.10+: create .venv,
# install the dependencies, build the wheel (fastlm._C with its CUDA kernels when nvcc is found), install it into
# .venv, then do their job. The tests run against the installed wheel from outside the source tree, so what is
# tested is what ships. `make dev` gives an editable install for working on the code.

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(abspath $(VENV))/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS       := $(TORCH_SPEC) triton ninja numpy pytest pytest-benchmark pytest-xdist pytest-timeout hypothesis matplotlib \
              ruff setuptools wheel build transformers
STAMP      := $(VENV)/.fastlm-deps
WHEEL      := dist/.built
SOURCES    := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh fastlm/*.py fastlm/*/*.py \
              kernels/*.py kernels/*/*.py)

# nvcc: CUDA_HOME if set, else /usr/local/cuda when it exists (setup.py decides from there; FASTLM_BUILD_CUDA overrides)
CUDA_HOME  ?= $(wildcard /usr/local/cuda)
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Triton kernels run through the interpreter on a machine without a GPU
INTERPRET   = $$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")

.PHONY: test bench wheel install dev deps lint clean twin torch-range

test: install  # tests in parallel over the machine's cores (pytest-xdist)
	cd /tmp && TRITON_INTERPRET=$${TRITON_INTERPRET-$(INTERPRET)} $(abspath $(VENV))/bin/pytest -q -n $(MAX_JOBS) \
		--rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml $(CURDIR)/tests $(CURDIR)/benchmarks --benchmark-disable

bench: install  # the console script: `python -m` from here would import the source tree instead of the wheel
	$(abspath $(VENV))/bin/fastlm bench --out bench-out

wheel: $(WHEEL)

$(WHEEL): $(STAMP) $(SOURCES)
	@echo "building the fastlm wheel (MAX_JOBS=$(MAX_JOBS), CUDA_HOME=$(CUDA_HOME), archs $${TORCH_CUDA_ARCH_LIST:-8.0;9.0})"
	@rm -f dist/fastlm-*.whl
	@start=$$(date +%s); \
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist . && \
	echo "wheel built in $$(( $$(date +%s) - start )) s: $$(ls dist/fastlm-*.whl)"
	@touch $@

install: $(WHEEL)
	$(PY) -m pip install -q --force-reinstall --no-deps dist/fastlm-*.whl

dev: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

deps: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	@touch $@

# The device's twin: the H200's software (Python 3.12, torch 2.11.0+cu130, Triton 3.6.0, transformers 5.17.0) in a
# second venv, where scripts/gpu_check.sh --dry-run builds fastlm from source (torch 2.11's default C++ standard),
# runs the whole suite through Triton 3.6's interpreter, the quick bench on CPU and the sanitizer workload, and writes
# the files the device run would (into TWIN_OUT).
TWIN_VENV   ?= .venv-twin
TWIN_PYTHON ?= $(or $(lastword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12)),$(shell command -v python3.12),$(PYTHON))
TWIN_DEPS   := torch==2.11.0 triton==3.6.0 transformers==5.17.0 numpy ninja setuptools wheel pytest pytest-benchmark \
               pytest-xdist pytest-timeout hypothesis matplotlib
TWIN_OUT    ?= twin-out

twin: $(TWIN_VENV)/.fastlm-twin-deps
	PYTHON=$(abspath $(TWIN_VENV))/bin/python bash scripts/gpu_check.sh $(TWIN_OUT) --dry-run

$(TWIN_VENV)/.fastlm-twin-deps:
	@start=$$(date +%s); $(TWIN_PYTHON) -m venv $(TWIN_VENV) && $(TWIN_VENV)/bin/python -m pip install -q $(TWIN_DEPS) \
		&& echo "twin venv ($$($(TWIN_VENV)/bin/python --version)) in $$(( $$(date +%s) - start )) s"
	@touch $@

# The promised torch range: the wheel under torch 2.10.0 (the floor) and the newest torch on the index, and the
# sources against 2.10's headers (scripts/torch_range.sh).
torch-range: wheel
	PYTHON=$(PYTHON) bash scripts/torch_range.sh

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build dist *.egg-info fastlm/_C*.so fastlm/_build_info.json bench-out $(TWIN_OUT) .venv-torch-*
