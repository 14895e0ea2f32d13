# Two commands on a fresh machine with Python 3.11:
#   make demo   install into .venv, run the default pipeline (dvc repro), print the release summary
#   make test   install into .venv, run the test suite
VENV := .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# Stages run as `python -m stages.<name>` under DVC: the venv must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# llama.cpp comes from one pinned source: the llama-cpp-python sdist, which vendors the whole
# llama.cpp tree. It is built once here (shared libraries for the Python bindings, and the
# quantize/imatrix/perplexity tools and llama-server, the OpenAI-compatible server a chat bundle
# is checked against), and the bindings are installed without a second build.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_DIR := $(VENV)/llama.cpp
LLAMA_SRC := $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)
LLAMA_TOOLS := llama-quantize llama-imatrix llama-perplexity llama-server
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

# The backend: CUDA where nvcc (on PATH or at /usr/local/cuda/bin) and an NVIDIA GPU are
# present (auto), else the CPU; `make install LLAMA_BACKEND=cpu|cuda` forces it. A CUDA build
# compiles for the GPUs' own architectures (compute capability 9.0 -> 90; several GPUs: their
# distinct ones, `;`-separated), or for LLAMA_CUDA_ARCHS where given. The bindings and the
# tools come from this one build; a CUDA build also runs models on the CPU.
LLAMA_BACKEND ?= auto
ifeq ($(filter $(LLAMA_BACKEND),auto cpu cuda),)
$(error LLAMA_BACKEND=$(LLAMA_BACKEND) is not allowed (allowed: auto | cpu | cuda))
endif
ifneq ($(LLAMA_BACKEND),cpu)
LLAMA_NVCC := $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))
ifeq ($(origin LLAMA_CUDA_ARCHS),undefined)
LLAMA_CUDA_ARCHS := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
	| grep -E '^ *[0-9]+\.[0-9]+ *$$' | tr -d ' .' | sort -n -u | paste -sd';' -)
endif
endif
LLAMA_BUILD_BACKEND := $(if $(filter auto,$(LLAMA_BACKEND)),$(if $(and $(LLAMA_NVCC),$(LLAMA_CUDA_ARCHS)),cuda,cpu),$(LLAMA_BACKEND))
ifeq ($(LLAMA_BUILD_BACKEND),cuda)
ifeq ($(LLAMA_NVCC),)
$(error LLAMA_BACKEND=cuda: nvcc is neither on PATH nor at /usr/local/cuda/bin/nvcc)
endif
ifeq ($(LLAMA_CUDA_ARCHS),)
$(error LLAMA_BACKEND=cuda: nvidia-smi shows no GPU; name the architectures, e.g. LLAMA_CUDA_ARCHS=90)
endif
LLAMA_CUDA_VERSION := $(shell $(LLAMA_NVCC) --version | sed -n 's/.*release .*, V\([0-9.]*\).*/\1/p')
LLAMA_BUILD_INFO := {"backend": "cuda", "cuda_version": "$(LLAMA_CUDA_VERSION)", "cuda_architectures": "$(LLAMA_CUDA_ARCHS)"}
else
LLAMA_BUILD_INFO := {"backend": "cpu"}
endif

.PHONY: install demo test bench keys clean browser FORCE

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	touch $@

$(LLAMA_SRC)/.extracted: $(VENV)/.created
	rm -rf $(LLAMA_DIR) && mkdir -p $(LLAMA_DIR)
	$(VENV)/bin/python -m pip download --quiet --no-deps --no-binary :all: --dest $(LLAMA_DIR) \
		llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_DIR)
	touch $@

# The shared libraries the bindings load, and the tools quantbuild runs (quantize, imatrix,
# perplexity), from the vendored tree; the log goes to build.log.
#
# The build is kept in the user's cache, under a key of everything that decides the binaries:
# the sdist's sha256, the CMake flags, the compilers, CMake and the CPU's instruction-set
# flags (GGML_NATIVE compiles for this CPU). Another clone on the same machine copies it
# instead of compiling for five minutes: the tools find their libraries beside them (RPATH
# $ORIGIN), and a smoke run of each tool must pass first; a missing, partial or failing
# cache entry is compiled from source, as with LLAMA_CACHE= (no cache).
LLAMA_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/quantbuild/llama.cpp
# A CUDA build adds its backend flags, and nvcc's version to the key; a CPU build's key is
# what it always was.
LLAMA_CMAKE_FLAGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
	-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON
ifeq ($(LLAMA_BUILD_BACKEND),cuda)
LLAMA_CMAKE_FLAGS += -DGGML_CUDA=ON -DCMAKE_CUDA_COMPILER=$(LLAMA_NVCC) -DCMAKE_CUDA_ARCHITECTURES="$(LLAMA_CUDA_ARCHS)"
endif
LLAMA_KEY = { sha256sum $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz | cut -c1-64; \
	echo '$(LLAMA_CMAKE_FLAGS) $(LLAMA_TOOLS)'; $${CC:-cc} --version | head -1; $${CXX:-c++} --version | head -1; \
	cmake --version | head -1; grep -m1 '^flags' /proc/cpuinfo; \
	$(if $(filter cuda,$(LLAMA_BUILD_BACKEND)),$(LLAMA_NVCC) --version | tail -2;) } | sha256sum | cut -c1-24
# Each tool starts (its libraries resolve, its instructions run on this CPU) and answers.
LLAMA_SMOKE = $(LLAMA_DIR)/build/bin/llama-quantize 2>&1 | grep -q '^usage:' \
	&& $(LLAMA_DIR)/build/bin/llama-imatrix --version >/dev/null 2>&1 \
	&& $(LLAMA_DIR)/build/bin/llama-perplexity --version >/dev/null 2>&1 \
	&& $(LLAMA_DIR)/build/bin/llama-server --version >/dev/null 2>&1

# The backend the installed build is for, rewritten only when it changes: a change rebuilds
# llama.cpp (or takes that backend's build from the cache) and reinstalls its libraries.
$(VENV)/.llama-backend: FORCE $(VENV)/.created
	@echo '$(LLAMA_BUILD_INFO)' | cmp -s - $@ || echo '$(LLAMA_BUILD_INFO)' > $@

# quantbuild-build.json beside the binaries says what they were compiled with (the backend;
# for CUDA, nvcc's version and the GPU architectures): the llama.cpp fingerprint reads it.
$(LLAMA_DIR)/.built: $(LLAMA_SRC)/.extracted $(VENV)/.llama-backend
	@key=$$($(LLAMA_KEY)); cache=$(LLAMA_CACHE)/$$key; \
	if [ -n "$(LLAMA_CACHE)" ] && [ -f $$cache/.complete ] && rm -rf $(LLAMA_DIR)/build \
		&& mkdir -p $(LLAMA_DIR)/build && cp -a $$cache/bin $(LLAMA_DIR)/build/ && $(LLAMA_SMOKE); then \
		echo "llama.cpp: the build for this machine from $$cache"; \
	else \
		rm -rf $(LLAMA_DIR)/build; \
		echo "llama.cpp: compiling the vendored tree (log: $(LLAMA_DIR)/build.log)"; \
		cmake -S $(LLAMA_SRC)/vendor/llama.cpp -B $(LLAMA_DIR)/build $(LLAMA_CMAKE_FLAGS) > $(LLAMA_DIR)/build.log 2>&1 \
		&& cmake --build $(LLAMA_DIR)/build -j $(JOBS) --target llama $(LLAMA_TOOLS) >> $(LLAMA_DIR)/build.log 2>&1 \
		&& $(LLAMA_SMOKE) || { tail -30 $(LLAMA_DIR)/build.log; exit 1; }; \
		if [ -n "$(LLAMA_CACHE)" ]; then \
			partial=$$cache.partial.$$$$; mkdir -p $$partial && cp -a $(LLAMA_DIR)/build/bin $$partial/ \
			&& touch $$partial/.complete && rm -rf $$cache && mv $$partial $$cache \
			|| { rm -rf $$partial; echo "llama.cpp: could not keep the build in $(LLAMA_CACHE)"; }; \
		fi; \
	fi
	echo '$(LLAMA_BUILD_INFO)' > $(LLAMA_DIR)/build/bin/quantbuild-build.json
	touch $@

# llama.cpp compiles in the background while pip installs the rest (they take about as long).
# pip byte-compiles what it installs: where PYTHONDONTWRITEBYTECODE is set, nothing else would.
PIP_INSTALL := $(VENV)/bin/python -m pip install --quiet
$(VENV)/.installed: pyproject.toml $(LLAMA_SRC)/.extracted $(VENV)/.llama-backend
	$(MAKE) --no-print-directory $(LLAMA_DIR)/.built & build=$$!; \
	$(PIP_INSTALL) torch==2.13.0 \
	&& $(PIP_INSTALL) $(LLAMA_SRC)/vendor/llama.cpp/gguf-py \
	&& CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(PIP_INSTALL) --no-binary llama-cpp-python \
		$(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz \
	&& $(PIP_INSTALL) -e '.[test,ray]'; installed=$$?; \
	wait $$build && test $$installed -eq 0
	lib=$$($(VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llama_cpp/lib; \
	mkdir -p $$lib && rm -f $$lib/*.so* && cp -P $(LLAMA_DIR)/build/bin/*.so* $$lib/
	touch $@

install: $(VENV)/.installed

demo: install
	dvc repro --quiet
	quantbuild summary
	quantbuild report

# The HTML report's test renders it in Debian's chromium: installed here where apt-get can
# (as root, as in CI); elsewhere that one test is skipped, saying so.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is not installed: the report's browser test will be skipped"

test: install browser
	pytest

bench: install
	python bench/pipeline.py
	python bench/quantize.py speed
	python bench/quantize.py quality
	python bench/gguf_variants.py speed
	python bench/gguf_variants.py quality
	python bench/gguf_variants.py imatrix
	python bench/gguf_variants.py throughput
	python bench/gguf_variants.py noise
	python bench/gguf_variants.py agreement
	python bench/gate_stability.py decisions
	python bench/gate_stability.py widths
	python bench/behaviour.py

# A signing key pair for bundles (keys/ is git-ignored; never commit the .key).
keys: install
	quantbuild keygen --out keys

clean:
	rm -rf artifacts
