#!/bin/bash
# The GGUF ladder on llama.cpp's CUDA target, beside its CPU target (issue #26), on an
# offline CUDA machine (the lent H200: no network, Python 3.12 with torch and transformers).
#
#   here:   bash bench/cuda_ladder.sh pack       .devcarry/: the pinned llama-cpp-python sdist's tree
#                                                (its models/, docs/, tests/ left out: 8 MB xz) and the
#                                                wheels of what that machine lacks (dvc, hydra, jsonschema:
#                                                bench/wheelhouse.txt without the torch-stack ones)
#           move data/baseline/workflow-chat-33m out of the tree for the call (64 MiB), then back
#   there:  bash bench/cuda_ladder.sh build      a venv over the system's torch, the wheels, and llama.cpp
#                                                built by the Makefile's own rule (CUDA: nvcc and a GPU
#                                                are there), its bindings installed as `make install` does
#           bash bench/cuda_ladder.sh ladder     `dvc repro` of the default ladder with
#                                                eval.targets=[llama.cpp-cpu,llama.cpp-cuda]; the decision
#                                                per target, each bundle verified on its target; $OUT/
#           bash bench/cuda_ladder.sh speed      llama-bench decode/prefill per type, CUDA and CPU
set -eo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CARRY=${CARRY:-.devcarry}
SDIST=llama_cpp_python-0.3.36
OUT=${OUT:-/tmp/out}

pack() {
  mkdir -p "$CARRY/wheels"
  # (the sdist carries a git pack of llama.cpp's history: 38 MB of the 64 MiB a call may carry)
  (cd .venv/llama.cpp && tar --exclude="$SDIST/.git" \
     --exclude="$SDIST/vendor/llama.cpp/"{models,docs,benches,media,.github,tests,examples,tools/ui/tests} \
     -cf - "$SDIST") | xz -T0 -6 > "$CARRY/llama-src.tar.xz"
  local platforms=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:)
  for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_26 manylinux_2_27 manylinux_2_28 \
             manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux1; do platforms+=(--platform "${tag}_x86_64"); done
  grep -v '^#' bench/wheelhouse.txt | grep -v -i -E '^(bitsandbytes|torchao|datasets|multiprocess|dill|httpx2|httpcore2)=' \
    > "$CARRY/requirements.txt"
  .venv/bin/pip download --quiet --no-deps "${platforms[@]}" -d "$CARRY/wheels" -r "$CARRY/requirements.txt"
  .venv/bin/pip wheel --quiet --no-deps -w "$CARRY/wheels" antlr4-python3-runtime==4.9.3
  du -sh "$CARRY"
}

build() {
  # the system's python3 is itself a venv: its site-packages (torch, transformers) joined by a .pth
  local system
  system=$(python3 -c "import site; print(site.getsitepackages()[0])")
  [ -x .venv/bin/python ] || python3 -m venv .venv
  echo "$system" > "$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/system-site.pth"
  .venv/bin/python -m pip install -q --no-index --no-deps --no-compile "$CARRY"/wheels/*.whl
  if [ ! -f .venv/llama.cpp/.built ]; then
    mkdir -p .venv/llama.cpp && tar -xJf "$CARRY/llama-src.tar.xz" -C .venv/llama.cpp
    touch .venv/.created && sleep 1 && touch ".venv/llama.cpp/$SDIST/.extracted"
  fi
  # the Makefile's own rule: it finds nvcc and the GPU and builds the CUDA backend
  local started=$SECONDS
  make --no-print-directory .venv/llama.cpp/.built LLAMA_CACHE= JOBS="$(nproc)"
  echo "llama.cpp build: $((SECONDS - started)) s; $(cat .venv/llama.cpp/build/bin/quantbuild-build.json)"
  cmake --build .venv/llama.cpp/build -j "$(nproc)" --target llama-bench >> .venv/llama.cpp/build.log 2>&1
  # the bindings from that build, as `make install` installs them (pip cannot build here)
  local site
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp -r ".venv/llama.cpp/$SDIST/llama_cpp" "$site/" && mkdir -p "$site/llama_cpp/lib"
  cp -P .venv/llama.cpp/build/bin/*.so* "$site/llama_cpp/lib/"
  mkdir -p "$site/llama_cpp_python-0.3.36.dist-info"
  printf 'Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: 0.3.36\n' \
    > "$site/llama_cpp_python-0.3.36.dist-info/METADATA"
  echo "$PWD/.venv/llama.cpp/$SDIST/vendor/llama.cpp/gguf-py" > "$site/gguf-vendored.pth"
  # (quantbuild pins Python 3.11; that machine has 3.12)
  .venv/bin/python -m pip install -q --no-index --no-deps --no-build-isolation --ignore-requires-python -e .
  .venv/bin/python -c "from quantbuild.runtimes.llama_cpp import devices; print('llama.cpp devices:', devices())"
}

ladder() {  # [hydra overrides], by default the default ladder on both targets; REPRO_FLAGS: dvc repro's
  export PATH=$PWD/.venv/bin:$PATH
  mkdir -p "$OUT"
  if [ ! -d .git ]; then
    git init -q && printf '/.devcarry/\n/.venv/\n' >> .git/info/exclude && git add -A \
      && git -c user.name=b -c user.email=b@b commit -qm bench
  fi
  [ -d .dvc ] || dvc init -q
  quantbuild compose --reset "${@:-eval.targets=[llama.cpp-cpu,llama.cpp-cuda]}"
  local started=$SECONDS
  dvc repro ${REPRO_FLAGS:-} 2>&1 | tee "$OUT/repro.log" | grep -E "^(Running stage|quantbuild|release|packaged)|: perplexity|ERROR" || true
  echo "dvc repro: $((SECONDS - started)) s"
  quantbuild summary | tee "$OUT/summary.txt"
  cp artifacts/release/decision.json "$OUT/"
  for bundle in artifacts/package/*/; do
    for target in llama.cpp-cpu llama.cpp-cuda; do
      echo "verify $bundle --target $target --behaviour: $(quantbuild verify "$bundle" --target "$target" --behaviour \
        2>&1 | tail -1)"
    done
  done | tee "$OUT/verify.txt"
  python bench/cuda_ladder.py stages "$OUT/repro.log" | tee "$OUT/stages.txt" || true
}

ladder1b() {  # a random Llama (MODEL: random-1b, random-8b), made here, on the CUDA target
  # Its weights are random, so its answers are too: the quality budgets are opened (every
  # variant's scores are noise around zero) and the gate decides on the operational win,
  # which is what this ladder measures. QUANTS: the ladder (by default no planned mix, so no
  # sensitivity stage; add gguf_mix_3p5 for one, its plan validated on the GPU).
  export PATH=$PWD/.venv/bin:$PATH
  local model=${MODEL:-random-1b}
  python bench/cuda_ladder.py prepare --model "$model"
  OUT=$OUT/$model ladder model="$model" \
    "quant=${QUANTS:-[gguf_f16,gguf_q8_0,gguf_q6_k,gguf_q4_0,gguf_q4_k_m_imat,gguf_iq4_xs_imat]}" \
    'eval.targets=[llama.cpp-cuda]' eval.limit=${LIMIT:-48} 'gate.must_not_degrade=[]' \
    gate.max_family_drop.retrieval=1.0 gate.max_family_drop.long_context=1.0 gate.max_family_drop.reasoning=1.0 \
    '+gate.max_family_drop.structured=1.0' gate.max_perplexity_increase_pct=1000 gate.max_kld_mean=10 \
    gate.max_kld_p99=100 gate.min_top1_agreement=0 gate.max_degenerate_increase=1.0 ${EXTRA:-}
}

speed() {
  python bench/cuda_ladder.py speed "$@" | tee "$OUT/speed.txt"
}

"$@"
