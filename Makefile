# fastlm: `make test` and `make bench` each do all set-up on a fresh Linux machine with Python 3.10+: create .venv,
# install the dependencies, build the wheel (fastlm._C with its CUDA kernels when nvcc is found), install it into
# .venv, then do their job. The tests run against the installed wheel from outside the source tree, so what is
# tested is what ships. `make dev` gives an editable install for working on the code.

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(abspath $(VENV))/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS       := $(TORCH_SPEC) triton ninja numpy pytest pytest-benchmark hypothesis matplotlib ruff setuptools wheel build \
              transformers
STAMP      := $(VENV)/.fastlm-deps
WHEEL      := dist/.built
SOURCES    := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh fastlm/*.py fastlm/*/*.py \
              kernels/*.py)

# nvcc: CUDA_HOME if set, else /usr/local/cuda when it exists (setup.py decides from there; FASTLM_BUILD_CUDA overrides)
CUDA_HOME  ?= $(wildcard /usr/local/cuda)
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Triton kernels run through the interpreter on a machine without a GPU
INTERPRET   = $$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")

.PHONY: test bench wheel install dev deps lint clean

test: install
	cd /tmp && TRITON_INTERPRET=$${TRITON_INTERPRET-$(INTERPRET)} $(abspath $(VENV))/bin/pytest -q \
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

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build dist *.egg-info fastlm/_C*.so fastlm/_build_info.json bench-out
