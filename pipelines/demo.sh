#!/usr/bin/env bash
# The demo's stages, step by step with the CLI (what `dvector demo` runs in one command):
# synthetic voices -> shards -> tiny model trained on the CPU -> EER on held-out voices -> pictures.
#
#   pipelines/demo.sh [OUT_DIR]            # about 2 minutes on 2 cores
#   pipelines/demo.sh --small [OUT_DIR]    # a smoke size (seconds); the tests run this
set -euo pipefail
if [[ "${1:-}" == "--small" ]]; then
  shift
  TRAIN="--speakers 40 --utterances 8" EVAL="--speakers 6 --utterances 6" STEPS=40 BATCH="-n 6 -m 4"
else
  TRAIN="--speakers 320 --utterances 12" EVAL="--speakers 16 --utterances 10" STEPS=1500 BATCH="-n 16 -m 8"
fi
OUT=${1:-dvector-demo-cli}
# shellcheck disable=SC2086
dvector synth "$OUT/data/train" $TRAIN --duration 1.5-3.5 --seed 0
# shellcheck disable=SC2086
dvector synth "$OUT/data/eval" $EVAL --duration 1.5-3.5 --seed 1000
dvector build-shards "$OUT/data/train" -o "$OUT/shards" --min-shards 4 --overwrite
rm -rf "$OUT/run"
# shellcheck disable=SC2086
dvector train "$OUT/shards" "$OUT/run" -i "$STEPS" -s "$STEPS" --valid-every $((STEPS / 5)) --model tiny \
  --optimizer adam --lr 0.003 --augment none --threads 1 $BATCH -l 100 -w 1
echo "untrained: $(dvector eval "$OUT/run" "$OUT/data/eval" --untrained --threads 1 | tail -n 1)"
dvector eval "$OUT/run" "$OUT/data/eval" --threads 1 --det "$OUT/det.png"
dvector visualize "$OUT/run" "$OUT/data/eval" -o "$OUT/tsne.png" --threads 1
