#!/usr/bin/env bash
# A wheelhouse for an offline CUDA machine, and its install there (the GPU ladder's stack).
#
#   bench/wheelhouse.sh build DIR [CUDA]   here, with the package registries (after `make install`):
#                                          bench/wheelhouse.txt for CPython 3.12 manylinux x86_64,
#                                          the sdist-only packages built into wheels, pypcre's sdist
#                                          and Debian's libpcre2 (static) for building it there;
#                                          CUDA (e.g. 130) keeps only that bitsandbytes library
#   bench/wheelhouse.sh install DIR TARGET on the offline machine: everything into TARGET, pypcre
#                                          built there, and TARGET/bin/{python,quantbuild}; then
#                                          export PYTHONPATH=$PWD/src:TARGET PATH=TARGET/bin:$PATH
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:)
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_26 manylinux_2_27 manylinux_2_28 manylinux_2_31 \
           manylinux_2_34 manylinux_2_35 manylinux1; do PLATFORMS+=(--platform "${tag}_x86_64"); done

build() {
  local dir=$1 cuda=${2:-}
  mkdir -p "$dir"
  .venv/bin/pip download --quiet --no-deps "${PLATFORMS[@]}" -d "$dir" -r bench/wheelhouse.txt
  # sdist only on the index: pure Python, so one wheel serves every Python 3
  .venv/bin/pip wheel --quiet --no-deps -w "$dir" gptqmodel==7.6.0 logbar==0.4.15 tokenicer==0.0.14 \
    defuser==0.0.28 device-smi==0.5.7 antlr4-python3-runtime==4.9.3
  .venv/bin/pip download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$dir" pypcre==0.6.4
  (cd "$dir" && apt-get download libpcre2-dev libpcre2-8-0 2>/dev/null)
  if [ -n "$cuda" ]; then
    # bitsandbytes ships a library per CUDA and ROCm release (about 40 MB): keep one, and the CPU's
    local wheel tmp
    wheel=$(ls "$dir"/bitsandbytes-*.whl) tmp=$(mktemp -d)
    (cd "$tmp" && unzip -q "$wheel" && find bitsandbytes -name 'libbitsandbytes_*.so' \
       ! -name "libbitsandbytes_cuda${cuda}.so" ! -name libbitsandbytes_cpu.so -delete \
     && grep -v 'libbitsandbytes_' bitsandbytes-*.dist-info/RECORD > R; grep -E "libbitsandbytes_(cpu|cuda${cuda})\.so" \
       bitsandbytes-*.dist-info/RECORD >> R; mv R bitsandbytes-*.dist-info/RECORD && rm "$wheel" && zip -qr "$wheel" .)
    rm -rf "$tmp"
  fi
  du -sh "$dir"
}

install() {
  local dir=$1 target=$2 pcre
  pcre=$(mktemp -d)
  for deb in "$dir"/*.deb; do dpkg -x "$deb" "$pcre"; done
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$target" "$dir"/*.whl
  PYPCRE_INCLUDE_DIR="$pcre/usr/include" PYPCRE_LIBRARY_PATH="$pcre/usr/lib/x86_64-linux-gnu/libpcre2-8.a" \
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$target" "$dir"/pypcre-*.tar.gz
  mkdir -p "$target/bin"
  # stages run `python -m ...`: a wrapper (not a link) keeps the interpreter's own environment
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$target/bin/python"
  printf '#!/bin/sh\nexec %s -c "from quantbuild.cli import main; main()" "$@"\n' "$(command -v python3)" \
    > "$target/bin/quantbuild"
  chmod +x "$target/bin/python" "$target/bin/quantbuild"
  echo "export PYTHONPATH=$PWD/src:$target PATH=$target/bin:\$PATH"
}

case "${1:-}" in
  build) build "${2:?DIR}" "${3:-}" ;;
  install) install "${2:?DIR}" "${3:?TARGET}" ;;
  *) sed -n 2,12p "$0"; exit 2 ;;
esac
