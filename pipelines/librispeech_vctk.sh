#!/usr/bin/env bash
# LibriSpeech + VCTK, the original project's README example, evaluated on LibriSpeech test-clean
# speakers (never seen in training).
#
#   pipelines/librispeech_vctk.sh LIBRISPEECH_DIR VCTK_DIR [WORK_DIR]
#   pipelines/librispeech_vctk.sh --smoke [WORK_DIR]     # a tiny generated tree of the same layout (CI runs this)
#
# LIBRISPEECH_DIR holds train-clean-360/ and test-clean/ (SPEAKER/CHAPTER/*.flac, 16 kHz);
# VCTK_DIR holds wav48/ (or wav48_silence_trimmed/) with pNNN/*.wav|flac at 48 kHz.
# Expected time and EER at full size: not yet measured.
# Environment: STEPS (default 300000), MODEL (ecapa-small) and LOSS (aamsoftmax): the best row of docs/results.md's
# encoder x loss table (MODEL=attentive LOSS=ge2e: the original project's LSTM), WORKERS (loader processes, 4), GPUS (1).
set -euo pipefail

if [[ "${1:-}" == "--smoke" ]]; then
  WORK=${2:-$(mktemp -d)}
  LS=$WORK/data/LibriSpeech VCTK=$WORK/data/VCTK-Corpus
  dvector synth "$LS/train-clean-360" --speakers 12 --utterances 8 --layout nested --prefix 1 --seed 1
  dvector synth "$LS/test-clean" --speakers 6 --utterances 6 --layout nested --prefix 9 --seed 2
  dvector synth "$VCTK/wav48" --speakers 6 --utterances 8 --prefix p2 --sample-rate 48000 --format wav --seed 3
  STEPS=${STEPS:-20} MODEL=${MODEL:-tiny} LOSS=${LOSS:-ge2e} WORKERS=${WORKERS:-0}
  TRAIN_FLAGS="-l 100 -s 10 --valid-every 10" GE2E_BATCH="-n 4 -m 4" PAIR_BATCH="-n 4 -m 2"
else
  LS=${1:?usage: $0 LIBRISPEECH_DIR VCTK_DIR [WORK_DIR] | --smoke [WORK_DIR]}
  VCTK=${2:?usage: $0 LIBRISPEECH_DIR VCTK_DIR [WORK_DIR]}
  WORK=${3:-work/librispeech_vctk}
  STEPS=${STEPS:-300000} MODEL=${MODEL:-ecapa-small} LOSS=${LOSS:-aamsoftmax} WORKERS=${WORKERS:-4}
  TRAIN_FLAGS="-s 10000 -d 100000"
  GE2E_BATCH="-n 64 -m 10 -l 140-180" PAIR_BATCH="-n 128 -m 2 -l 200 --margin-warmup 30000"
fi
VCTK_WAVS=$VCTK/wav48
[[ -d $VCTK_WAVS ]] || VCTK_WAVS=$VCTK/wav48_silence_trimmed

dvector build-shards "$LS/train-clean-360" "$VCTK_WAVS" -o "$WORK/shards" -e wav,flac
# shellcheck source=train_step.sh
source "$(dirname "$0")/train_step.sh"
dvector eval "$WORK/run" "$LS/test-clean" --det "$WORK/det.png"
dvector visualize "$WORK/run" "$LS/test-clean" -o "$WORK/tsne.png"
dvector export "$WORK/run" -o "$WORK/exported"
echo "done: results in $WORK (eval.json in $WORK/run, det.png, tsne.png, exported/)"
