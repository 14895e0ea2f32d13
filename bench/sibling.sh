#!/bin/bash
# The larger sibling of issue #12 (item 5), trained data parallel on every GPU of a lent machine
# in two calls of at most 10 minutes each. The run itself is a daemon (setsid), so it goes on
# between the calls while the machine stays warm.
#
#   PHASE=start  bash bench/sibling.sh   install the wheelhouse (.whl, carried), start training
#                                        and then the report as a daemon, watch until ~9.5 min
#   PHASE=finish bash bench/sibling.sh   wait for it, then bring back the weights, the report
#                                        and the log under $OUT (7 files, within the call's limits)
#
# The recipe (the model card and bench/README.md quote it): the bundled tokenizer, 9 layers of
# hidden 512 (32.8M parameters), global batch 256 x 1024 tokens, peak rate 2e-3, seed 0, the
# retrieval family weighted 8 instead of 5, steps sized by a timing probe to BUDGET seconds.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
W=${WORK:-/tmp/sibling}
BUDGET=${BUDGET:-820}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
ARCH=${ARCH:---hidden 512 --layers 9 --intermediate 1536 --heads 8}
BATCH=${BATCH:-256}
START=$(date +%s)

watch_until() {  # $1: seconds since this call's start
  while [ ! -f "$W/done" ] && [ $(( $(date +%s) - START )) -lt "$1" ]; do sleep 5; done
  grep -v -i warn "$W/train.log" | tail -4
}

case $PHASE in
start)
  mkdir -p "$W"
  if [ -d "${WHEELS:-.whl}" ]; then
    bash bench/wheelhouse.sh install "${WHEELS:-.whl}" /tmp/site 2>"$W/install.log" | tail -1 > "$W/env" || { tail "$W/install.log"; exit 1; }
  else
    echo "export PYTHONPATH=$PWD/src" > "$W/env"
  fi
  . "$W/env"
  echo "installed: $(python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count(), "GPUs")')"
  setsid nohup bash -c "
    python3 -m torch.distributed.run --standalone --nproc_per_node $GPUS -m quantbuild.baseline.train \
      --tokenizer data/baseline/workflow-llama-8m --out $W/model --batch $BATCH --seq-len 1024 --lr 2e-3 \
      --seed 0 --workers $(( $(nproc) > 12 ? $(nproc) - 8 : 2 )) --time-budget $BUDGET $ARCH \
      --max-shard-size 16700KB --checkpoint $W/ckpt --mix retrieval=8 > $W/train.log 2>&1 &&
    python3 -m quantbuild.baseline.report --model $W/model --limit 300 --batch-size 150 \
      --json $W/model/report.json > $W/report.log 2>&1
    echo \$? > $W/done" > /dev/null 2>&1 < /dev/null &
  watch_until "${WATCH:-570}"
  ;;
finish)
  watch_until "${WATCH:-580}"
  [ -f "$W/done" ] || { echo "still running"; exit 3; }
  grep -v -i warn "$W/report.log" | tail -3
  cp "$W/train.log" "$W/report.log" "$W/model/" 2>/dev/null
  cp "$W"/model/*.safetensors "$OUT/" && tar -cf "$OUT/small.tar" -C "$W/model" --exclude='*.safetensors' .
  ls -la "$OUT"
  exit "$(cat "$W/done")"
  ;;
*) echo "PHASE=start|finish" >&2; exit 2 ;;
esac
