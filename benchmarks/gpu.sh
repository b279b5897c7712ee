#!/usr/bin/env bash
# GPU readiness of every encoder, on one CUDA device: training steps/s and the data-wait fraction at the
# paper's batch (N=64 speakers x M=10 utterances x L=160 frames) with bf16 autocast and torch.compile, then
# embedding throughput (windows/s). Needs a CUDA build of torch and this project installed
# (pip install -e .); fits in about 10 minutes of one modern GPU.
#
#     bash benchmarks/gpu.sh              # every encoder
#     MODELS=tiny,ecapa-small bash benchmarks/gpu.sh
#     PYTHON=.venv/bin/python bash benchmarks/gpu.sh
#
# Each bench_train run trains STEPS measured steps after WARMUP (compilation happens in the warm-up) on
# synthetic shards cached in $TMPDIR; LOSS picks the loss (default ge2e). The last line is the embedding
# benchmark's last line.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-all}
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-10}
LOSS=${LOSS:-ge2e}
WORKERS=${WORKERS:-4}
PYTHON=${PYTHON:-python}  # a python with torch (CUDA build) and this project installed
if ! "$PYTHON" -c "import torch, dvector" 2>/dev/null; then
    echo "benchmarks/gpu.sh: $PYTHON cannot import torch and dvector (pip install -e . first, or set PYTHON=)" >&2
    exit 2
fi
"$PYTHON" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: no CUDA device visible to torch (this script measures GPUs only)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else 'absent'}")
PY
"$PYTHON" benchmarks/bench_train.py --model "$MODELS" --device cuda --compile -n 64 -m 10 -l 160 \
    --steps "$STEPS" --warmup "$WARMUP" --workers "$WORKERS" --loss "$LOSS" --skip-loss
"$PYTHON" benchmarks/bench_embed.py --model "$MODELS" --device cuda --compile
