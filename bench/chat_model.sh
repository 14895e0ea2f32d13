#!/bin/bash
# The bundled instruct model (issue #25): the 33M sibling fine-tuned on a lent GPU into a chat
# model: the task generators rendered as conversations through quantbuild's ChatML template
# with tool calls in <tool_call> tags (src/quantbuild/baseline/chat.py), context 2048.
#
#   here:   tar -C data/baseline/workflow-llama-33m -cf - . | xz -6 > .devcarry/init.tar.xz
#           (and the jsonschema closure as wheels in .devcarry/, for the report's scorers);
#           move data/baseline/ out of the working tree for the call (64 MiB), then back
#   there:  bash bench/chat_model.sh      tokenizer, fine-tune for BUDGET seconds, then the
#           report through the chat template; $OUT gets the shards and small.tar (the rest)
set -eo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
W=${WORK:-/tmp/chat}
BUDGET=${BUDGET:-300}
CARRY=${CARRY:-.devcarry}
mkdir -p "$W"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/*.whl
export PYTHONPATH=$PWD/src:/tmp/site
python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$CARRY/init.tar.xz" "$W/init"
python3 -m quantbuild.baseline.chat --from "$W/init" --out "$W/tokenizer"
python3 -m quantbuild.tasks.write_data --out "$W/data"
python3 -m quantbuild.baseline.train --tokenizer "$W/tokenizer" --init "$W/init" --out "$W/model" --batch 64 \
  --seq-len 2048 --lr 5e-4 --seed 0 --workers $(( $(nproc) > 12 ? $(nproc) - 4 : 2 )) --time-budget "$BUDGET" \
  --max-shard-size 16700KB --mix retrieval=8 2>&1 | grep -v -i warn | tee "$W/train.log" | tail -3
python3 -m quantbuild.baseline.report --model "$W/model" --eval "$W/data/eval" --limit 300 --batch-size 150 \
  --json "$W/model/report.json" 2>&1 | grep -v -i warn | tee "$W/report.log" | tail -2
cp "$W/train.log" "$W/report.log" "$W/model/"
cp "$W"/model/*.safetensors "$OUT/" && tar -cf "$OUT/small.tar" -C "$W/model" --exclude='*.safetensors' .
ls -la "$OUT"
