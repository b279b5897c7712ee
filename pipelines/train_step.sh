# Sourced by the recipes: check the shards in $WORK/shards, then train (or continue) into $WORK/run
# with torchrun when GPUS > 1. Uses WORK, STEPS, MODEL, WORKERS and TRAIN_FLAGS.
dvector check "$WORK/shards"
if [[ ${GPUS:-1} -gt 1 ]]; then
  TRAIN=(torchrun --nproc-per-node="$GPUS" -m dvector train)
else
  TRAIN=(dvector train)
fi
if [[ -e $WORK/run/checkpoints/latest.pt ]]; then RESUME=(-c "$WORK/run"); else RESUME=(); fi
# shellcheck disable=SC2086
"${TRAIN[@]}" "$WORK/shards" "$WORK/run" -i "$STEPS" --model "$MODEL" -w "$WORKERS" $TRAIN_FLAGS "${RESUME[@]}"
