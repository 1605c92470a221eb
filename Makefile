# fastlm: `make test` and `make bench` each do all set-up on a fresh Linux machine with Python 3.10+:
# create .venv, install the dependencies, build fastlm._C (CUDA kernels too when nvcc is found), then do their job.

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS       := $(TORCH_SPEC) triton ninja numpy pytest pytest-benchmark hypothesis matplotlib ruff setuptools wheel \
              transformers
STAMP      := $(VENV)/.fastlm-deps
CSRC       := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
SO         := fastlm/.built

# nvcc: CUDA_HOME if set, else /usr/local/cuda when it exists (setup.py decides from there; FASTLM_BUILD_CUDA overrides)
CUDA_HOME  ?= $(wildcard /usr/local/cuda)
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: test bench build deps lint clean

test: build
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
		$(PY) -m pytest -q tests benchmarks --benchmark-disable

bench: build
	$(PY) -m fastlm bench --out bench-out

build: $(SO)

$(SO): $(STAMP) $(CSRC) setup.py pyproject.toml
	@echo "building fastlm._C (MAX_JOBS=$(MAX_JOBS), CUDA_HOME=$(CUDA_HOME))"
	@start=$$(date +%s); \
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . && \
	echo "fastlm._C built in $$(( $$(date +%s) - start )) s"
	@touch $@

deps: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	@touch $@

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build dist *.egg-info fastlm/_C*.so $(SO) bench-out
