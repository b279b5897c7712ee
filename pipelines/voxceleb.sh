#!/usr/bin/env bash
# VoxCeleb1 dev + VoxCeleb2 dev for training, the official VoxCeleb1 test trial list for evaluation.
#
#   pipelines/voxceleb.sh VOX1_DIR VOX2_DIR [WORK_DIR]
#   pipelines/voxceleb.sh --smoke [WORK_DIR]      # a tiny generated tree of the same layout (CI runs this)
#
# VOX1_DIR holds dev/wav/idNNNNN/VIDEO/NNNNN.wav, test/wav/... and veri_test2.txt (the cleaned
# VoxCeleb1-O list: "label id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav").
# VOX2_DIR holds dev/aac/idNNNNN/VIDEO/NNNNN.m4a: decoding m4a needs `pip install 'dvector[m4a]'`.
# Eight GPUs: GPUS=8 pipelines/voxceleb.sh ...; building on a cluster: see docs/at-scale.md (--part i/n).
# Noise and rooms for augmentation: MUSAN=/data/musan RIRS=/data/RIRS_NOISES pipelines/voxceleb.sh ...
# Encoder and loss: MODEL (ecapa-small) and LOSS (aamsoftmax), the best row of docs/results.md's table; MODEL=ecapa is
# the full-width ECAPA-TDNN, MODEL=paper LOSS=ge2e the GE2E paper's LSTM.
# Expected time and EER at full size: not yet measured.
set -euo pipefail

if [[ "${1:-}" == "--smoke" ]]; then
  WORK=${2:-$(mktemp -d)}
  VOX1=$WORK/data/VoxCeleb1 VOX2=$WORK/data/VoxCeleb2
  dvector synth "$VOX1/dev/wav" --speakers 10 --utterances 8 --layout nested --prefix id1 --seed 1
  dvector synth "$VOX1/test/wav" --speakers 5 --utterances 6 --layout nested --prefix id9 --seed 2
  dvector synth "$VOX2/dev/aac" --speakers 6 --utterances 8 --layout nested --prefix id0 --seed 3
  # a trial list in the official format: every pair of the first two files of each test speaker,
  # and each speaker's first file against the next speaker's first file
  (cd "$VOX1/test/wav" && find . -name '*.flac' | sed 's|^\./||' | sort) | awk -F/ '
    { files[$1] = files[$1] " " $0; order[n++] = $1 }
    END { for (s in files) { split(files[s], f, " "); if (f[2] != "") print 1, f[1], f[2] }
          prev = ""; for (i = 0; i < n; i++) if (order[i] != prev) { if (prev != "") { split(files[prev], a, " "); split(files[order[i]], b, " "); print 0, a[1], b[1] } prev = order[i] } }' \
    > "$VOX1/veri_test2.txt"
  STEPS=${STEPS:-20} MODEL=${MODEL:-tiny} LOSS=${LOSS:-aamsoftmax} WORKERS=${WORKERS:-0} EXT=flac
  TRAIN_FLAGS="-l 100 -s 10 --valid-every 10" GE2E_BATCH="-n 4 -m 4" PAIR_BATCH="-n 4 -m 2"
else
  VOX1=${1:?usage: $0 VOX1_DIR VOX2_DIR [WORK_DIR] | --smoke [WORK_DIR]}
  VOX2=${2:?usage: $0 VOX1_DIR VOX2_DIR [WORK_DIR]}
  WORK=${3:-work/voxceleb}
  # defaults from the encoder x loss table in docs/results.md; MODEL=paper LOSS=ge2e trains the GE2E paper's LSTM
  STEPS=${STEPS:-1000000} MODEL=${MODEL:-ecapa-small} LOSS=${LOSS:-aamsoftmax} WORKERS=${WORKERS:-6} EXT=wav,m4a
  TRAIN_FLAGS="-s 10000 -d 300000 --valid-every 5000"
  GE2E_BATCH="-n 64 -m 10 -l 140-180" PAIR_BATCH="-n 128 -m 2 -l 200 --margin-warmup 100000"
  # augmentation is on by default; MUSAN and RIRS_NOISES, where you have them, replace the synthetic sources
  if [[ -n ${MUSAN:-} ]]; then TRAIN_FLAGS="$TRAIN_FLAGS --noise-dir $MUSAN"; fi
  if [[ -n ${RIRS:-} ]]; then TRAIN_FLAGS="$TRAIN_FLAGS --rir-dir $RIRS"; fi
fi

dvector build-shards "$VOX1/dev/wav" "$VOX2/dev/aac" -o "$WORK/shards" -e "$EXT,flac"
# shellcheck source=train_step.sh
source "$(dirname "$0")/train_step.sh"
dvector eval "$WORK/run" "$VOX1/test/wav" --trials "$VOX1/veri_test2.txt" --det "$WORK/det.png"
dvector export "$WORK/run" -o "$WORK/exported"
echo "done: results in $WORK (eval.json in $WORK/run, det.png, exported/)"
