#!/bin/bash
# One device call's work, started detached so it outlives the call (`setsid`), its progress in
# /tmp/out/job.log (STEP lines, ALL_DONE at the end); poll it from the next calls, each made
# within the machine's idle window:
#
#   bash bench/cuda_ladder.sh pack                       # here, after `make install`: .devcarry/
#   mv data/baseline/workflow-chat-33m /work/aside/      # here: a call carries at most 64 MiB
#   run (carry .devcarry): setsid bash bench/cuda_job.sh >/dev/null 2>&1 </dev/null &
#                          then poll /tmp/out/job.log, copy /tmp/out/* to $OUT
#
# llama.cpp built with CUDA, then STEPS (default: the batched bench on the bundled 8M model,
# bench/batched.py; the random-8b ladder with two stock types, QUANTS_8B; the random-1b ladder
# with two and the planned mix, QUANTS_1B, EXTRA_1B: more overrides), on llama.cpp-cuda (each
# `dvc repro`'s stage times in /tmp/out/<model>/repro.log). It works in a copy of the tree in
# /tmp/job, so that a later call's copy of the working tree cannot change params.yaml or
# dvc.lock under a running `dvc repro`.
mkdir -p /tmp/out
exec > /tmp/out/job.log 2>&1
started=$SECONDS
rm -rf /tmp/job && mkdir -p /tmp/job && cp -a "$(dirname "$0")/.."/. /tmp/job/ && cd /tmp/job
nvidia-smi --query-gpu=name,memory.total --format=csv
bash bench/cuda_ladder.sh build
echo "STEP build done $((SECONDS - started)) s"
export PATH=$PWD/.venv/bin:$PATH
# STEPS: which of the steps below run, in order (by default all but batched8b)
batched8m() {
  # a trained model (the bundled 8M: a minute): how many greedy answers a batch changes on
  # CUDA, where the random 8B changed 159 of 192 (near-flat distributions, bench/README.md)
  python -X faulthandler bench/batched.py --device cuda --types F16 Q4_K_M --batch 32 \
    > /tmp/out/batched8m.txt 2>&1
}
ladder8b() {
  rm -rf /tmp/tmp*  # a crashed bench leaves its 8B files (33 GB) behind
  # at 8B DVC's cache (a copy of every output) does not fit the 64 GB disk beside the model,
  # its copy in artifacts/, its F16 GGUF and the variants: the outputs are not committed to it
  # (TARGET_8B: a stage to stop after, e.g. `sensitivity` with QUANTS_8B=[gguf_mix_3p5])
  MODEL=random-8b QUANTS=${QUANTS_8B:-'[gguf_q4_0,gguf_q4_k_m_imat]'} OUT=/tmp/out \
    REPRO_FLAGS="--no-commit ${TARGET_8B:-}" \
    bash bench/cuda_ladder.sh ladder1b > /tmp/out/ladder8b.txt 2>&1
  cp -r logs /tmp/out/random-8b/logs 2>/dev/null
  rm -rf artifacts .dvc/cache bench/out/random-8b data/baseline/random-8b logs
}
ladder1b() {
  # the random 1B with the planned mix: its sensitivity from a sample of rows (forced below
  # the 1B-weight default with sample_rows_params=0), its plan validated on the GPU, then
  # select and package: the release decision for the CUDA target (F16 in the ladder: on
  # 2026-12-06 no quantized type was faster there, and without it nothing could be released)
  MODEL=random-1b QUANTS=${QUANTS_1B:-'[gguf_f16,gguf_q4_0,gguf_q4_k_m_imat,gguf_mix_3p5]'} OUT=/tmp/out \
    EXTRA=${EXTRA_1B:-calibration.sensitivity.sample_rows_params=0} \
    bash bench/cuda_ladder.sh ladder1b > /tmp/out/ladder1b.txt 2>&1
  cp -r logs /tmp/out/random-1b/logs 2>/dev/null
  rm -rf artifacts .dvc/cache bench/out/random-1b data/baseline/random-1b logs
}
batched8b() {
  # the random 8B's F16 rows were measured on 2026-12-05 (each mode loads the 14 GB model again)
  python -X faulthandler bench/batched.py --device cuda --random random-8b --types Q4_K_M --items 64 --batch 64 \
    > /tmp/out/batched8b.txt 2>&1
}
chat8b() {
  # the random 8B with the 33M chat model's tokenizer and template: the prompts an instruct
  # model is given (system prompt and tool list in front of every item), so prompts that
  # share a prefix prefill it once (only its tokenizer files travel: the weights stay here)
  python -X faulthandler bench/batched.py --device cuda --random random-8b --tokenizer data/baseline/workflow-chat-33m \
    --types F16 --items 64 --batch 64 > /tmp/out/chat8b.txt 2>&1
}
for step in ${STEPS:-batched8m ladder8b ladder1b}; do
  "$step"
  echo "STEP $step done $((SECONDS - started)) s"
done
echo ALL_DONE
