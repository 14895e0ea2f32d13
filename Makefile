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

.PHONY: install demo test bench keys clean browser

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
LLAMA_CMAKE_FLAGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON \
	-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON
LLAMA_KEY = { sha256sum $(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz | cut -c1-64; \
	echo '$(LLAMA_CMAKE_FLAGS) $(LLAMA_TOOLS)'; $${CC:-cc} --version | head -1; $${CXX:-c++} --version | head -1; \
	cmake --version | head -1; grep -m1 '^flags' /proc/cpuinfo; } | sha256sum | cut -c1-24
# Each tool starts (its libraries resolve, its instructions run on this CPU) and answers.
LLAMA_SMOKE = $(LLAMA_DIR)/build/bin/llama-quantize 2>&1 | grep -q '^usage:' \
	&& $(LLAMA_DIR)/build/bin/llama-imatrix --version >/dev/null 2>&1 \
	&& $(LLAMA_DIR)/build/bin/llama-perplexity --version >/dev/null 2>&1 \
	&& $(LLAMA_DIR)/build/bin/llama-server --version >/dev/null 2>&1

$(LLAMA_DIR)/.built: $(LLAMA_SRC)/.extracted
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
	touch $@

# llama.cpp compiles in the background while pip installs the rest (they take about as long).
# pip byte-compiles what it installs: where PYTHONDONTWRITEBYTECODE is set, nothing else would.
PIP_INSTALL := $(VENV)/bin/python -m pip install --quiet
$(VENV)/.installed: pyproject.toml $(LLAMA_SRC)/.extracted
	$(MAKE) --no-print-directory $(LLAMA_DIR)/.built & build=$$!; \
	$(PIP_INSTALL) torch==2.13.0 \
	&& $(PIP_INSTALL) $(LLAMA_SRC)/vendor/llama.cpp/gguf-py \
	&& CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(PIP_INSTALL) --no-binary llama-cpp-python \
		$(LLAMA_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz \
	&& $(PIP_INSTALL) -e '.[test,ray]'; installed=$$?; \
	wait $$build && test $$installed -eq 0
	lib=$$($(VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llama_cpp/lib; \
	mkdir -p $$lib && cp -P $(LLAMA_DIR)/build/bin/*.so* $$lib/
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
