#!/usr/bin/env bash
# Train on most speakers of ../shared/data/real-dev (real recordings, 4 corpora) for a fixed time
# and report EER on the held-out speakers, trials within one corpus, next to the untrained network.
#
#   [MODEL=tiny] benchmarks/real_dev.sh [WORK_DIR] [MINUTES]    (defaults: attentive, /tmp/dvector-real-dev, 25)
set -euo pipefail
DATA=${REAL_DEV:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/real-dev}
WORK=${1:-/tmp/dvector-real-dev}
MINUTES=${2:-25}
MODEL=${MODEL:-attentive}
[[ -d $DATA ]] || { echo "no real-dev data at $DATA" >&2; exit 1; }

# held out: az48-az59, emodb spk14-16, fsdd theo and yweweler, LibriSpeech 3331, 367, 533
heldout() {
  case "$1/$2" in
    audiomnist_az/az4[89]|audiomnist_az/az5?|emodb/spk1[456]|fsdd/theo|fsdd/yweweler) return 0 ;;
    librispeech_test_other/3331|librispeech_test_other/367|librispeech_test_other/533) return 0 ;;
  esac
  return 1
}
rm -rf "$WORK/train" "$WORK/heldout"
for corpus in audiomnist_az emodb fsdd librispeech_test_other; do
  mkdir -p "$WORK/train/$corpus" "$WORK/heldout/$corpus"
  for speaker in "$DATA/$corpus"/*/; do
    speaker=$(basename "$speaker")
    if heldout "$corpus" "$speaker"; then side=heldout; else side=train; fi
    ln -s "$DATA/$corpus/$speaker" "$WORK/$side/$corpus/$speaker"
  done
done

CORPORA=(audiomnist_az emodb fsdd librispeech_test_other)
dvector build-shards "${CORPORA[@]/#/$WORK/train/}" -o "$WORK/shards_train" -e flac
dvector build-shards "${CORPORA[@]/#/$WORK/heldout/}" -o "$WORK/shards_heldout" -e flac
rm -rf "$WORK/run"
dvector train "$WORK/shards_train" "$WORK/run" -i 1000000 --max-minutes "$MINUTES" --model "$MODEL" \
  --optimizer adam -n 16 -m 8 -l 100 -s 1000 --valid "$WORK/shards_heldout" --valid-every 500 -w 1 --threads 1
for corpus in "${CORPORA[@]}"; do
  untrained=$(dvector eval "$WORK/run" "$WORK/heldout/$corpus" --untrained --threads 1 -e flac | tail -n 1)
  trained=$(dvector eval "$WORK/run" "$WORK/heldout/$corpus" --no-save --det "$WORK/det-$corpus.png" --threads 1 -e flac | tail -n 1)
  echo "$corpus: untrained ${untrained#EER=}, trained ${trained#EER=}"
done
