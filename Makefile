# fastlm: `make test` and `make bench` each do all set-up on a fresh Linux machine with Python 3.10+: create .venv,
# install the dependencies, build the wheel (fastlm._C with its CUDA kernels when nvcc is found), install it into
# .venv, then do their job. The tests run against the installed wheel from outside the source tree, so what is
# tested is what ships. `make dev` gives an editable install for working on the code.

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(abspath $(VENV))/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS       := $(TORCH_SPEC) triton ninja numpy pytest pytest-benchmark pytest-xdist pytest-timeout hypothesis matplotlib \
              ruff setuptools wheel build transformers trl==1.16.0
# Liger-Kernel's chunked losses (pure torch + torch.compile): the post-training tests and bench compare with them.
# --no-deps: its requirements would move torch / triton off the pins above.
TEST_NODEPS := liger-kernel==0.8.5
STAMP      := $(VENV)/.fastlm-deps
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

.PHONY: test bench wheel install dev deps lint clean twin torch-range cuda-wheels

test: install  # tests in parallel over the machine's cores (pytest-xdist)
	cd /tmp && TRITON_INTERPRET=$${TRITON_INTERPRET-$(INTERPRET)} $(abspath $(VENV))/bin/pytest -q -n $(MAX_JOBS) \
		--rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml $(CURDIR)/tests $(CURDIR)/benchmarks --benchmark-disable

bench: install  # the console script: `python -m` from here would import the source tree instead of the wheel
	$(abspath $(VENV))/bin/fastlm bench --out bench-out

# One wheel per CUDA major: CUDA_MAJOR=13 (default) builds in .venv (the development torch, CUDA 13) with CUDA_HOME;
# CUDA_MAJOR=12 builds in the floor venv (torch 2.10.0+cu128, the oldest torch of the stable-ABI range) with a CUDA 12
# nvcc that scripts/cuda_wheels.sh assembles into CUDA12_HOME when that has none (no GPU, no system toolkit needed),
# from a copy of the sources under build/cu12-src (its own ninja tree); both write dist/fastlm-<version>+cuNN-*.whl.
# The +cu12 build reuses a fastlm._C compiled from identical inputs (setup.py, FASTLM_EXT_CACHE; EXT_CACHE= to
# disable), then checks the wheel: CUDA 12 nvcc in _build_info.json, sm_80 and sm_90 cubins (cuobjdump --list-elf).
CUDA_MAJOR  ?= 13
FLOOR_VENV  ?= .venv-torch-floor
CUDA12_HOME ?= $(HOME)/.cache/fastlm/cuda-12.4
EXT_CACHE   ?= $(HOME)/.cache/fastlm/ext
export FLOOR_VENV CUDA12_HOME
ARCHS       := $${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
ifeq ($(CUDA_MAJOR),13)
WHEEL := dist/.built
else ifeq ($(CUDA_MAJOR),12)
WHEEL := dist/.built-cu12
else
$(error CUDA_MAJOR must be 12 or 13, got $(CUDA_MAJOR))
endif

wheel: $(WHEEL)

dist/.built: $(STAMP) $(SOURCES)
	@echo "building the fastlm wheel (MAX_JOBS=$(MAX_JOBS), CUDA_HOME=$(CUDA_HOME), archs $(ARCHS))"
	@for w in dist/fastlm-*.whl; do case $$w in *+cu12-*) ;; *) rm -f $$w ;; esac; done
	@start=$$(date +%s); \
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist . && \
	echo "wheel built in $$(( $$(date +%s) - start )) s: $$(ls dist/fastlm-*.whl | grep -v +cu12-)"
	@touch $@

dist/.built-cu12: $(SOURCES) scripts/cuda_wheels.sh
	@PYTHON=$(PYTHON) bash scripts/cuda_wheels.sh floor-venv
	@PYTHON=$(PYTHON) bash scripts/cuda_wheels.sh toolkit12
	@echo "building the fastlm +cu12 wheel (MAX_JOBS=$(MAX_JOBS), CUDA_HOME=$(CUDA12_HOME), archs $(ARCHS))"
	@rm -f dist/fastlm-*+cu12-*.whl
	@mkdir -p build/cu12-src && cd build/cu12-src && rm -rf setup.py pyproject.toml MANIFEST.in README.md csrc fastlm \
		kernels && cp -rp $(addprefix $(CURDIR)/,setup.py pyproject.toml MANIFEST.in README.md csrc fastlm kernels) . \
		&& rm -f fastlm/_C*.so fastlm/_build_info.json
	@start=$$(date +%s); cd build/cu12-src && \
	CUDA_HOME=$(CUDA12_HOME) FASTLM_BUILD_CUDA=1 FASTLM_EXT_CACHE=$(EXT_CACHE) TORCH_CUDA_ARCH_LIST="$(ARCHS)" \
		$(abspath $(FLOOR_VENV))/bin/python -m pip wheel -q --no-build-isolation --no-deps -w $(CURDIR)/dist . && \
	echo "+cu12 wheel built in $$(( $$(date +%s) - start )) s: $$(ls $(CURDIR)/dist/fastlm-*+cu12-*.whl)"
	@[ -z "$(EXT_CACHE)" ] || tail -1 $(EXT_CACHE)/log
	@PYTHON=$(PYTHON) bash scripts/cuda_wheels.sh verify12
	@touch $@

install: dist/.built  # the default (+cu13) wheel into .venv
	$(PY) -m pip install -q --force-reinstall --no-deps $$(ls dist/fastlm-*.whl | grep -v +cu12-)

# Item 2 of the wheels issue: the +cu12 wheel beside torch 2.10.0+cu128 (the floor venv) and the +cu13 wheel beside
# the development torch (.venv), each: fastlm info without a CUDA-major mismatch, every cpu op against torch.
cuda-wheels: install
	$(MAKE) --no-print-directory wheel CUDA_MAJOR=12
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/cuda_wheels.sh check

dev: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

deps: $(STAMP)

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-deps $(TEST_NODEPS)
	@touch $@

# The device's twin: the H200's software (Python 3.12, torch 2.11.0+cu130, Triton 3.6.0, transformers 5.17.0) in a
# second venv, where scripts/gpu_check.sh --dry-run builds fastlm from source (torch 2.11's default C++ standard),
# runs the whole suite through Triton 3.6's interpreter, the quick bench on CPU and the sanitizer workload, and writes
# the files the device run would (into TWIN_OUT). numpy < 2.4: Triton 3.6's interpreter reads a scalar kernel
# argument (a 1-element array) with int(), which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to
# Python scalars": every interpreted loop over a runtime bound failed); Triton 3.8 squeezes it first.
TWIN_VENV   ?= .venv-twin
TWIN_PYTHON ?= $(or $(lastword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12)),$(shell command -v python3.12),$(PYTHON))
TWIN_DEPS   := torch==2.11.0 triton==3.6.0 transformers==5.17.0 'numpy<2.4' ninja setuptools wheel pytest pytest-benchmark \
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
torch-range: dist/.built
	PYTHON=$(PYTHON) bash scripts/torch_range.sh

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build dist *.egg-info fastlm/_C*.so fastlm/_build_info.json bench-out $(TWIN_OUT) .venv-torch-*
