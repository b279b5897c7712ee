# Sourced by the recipes: check the shards in $WORK/shards, then train (or continue) into $WORK/run
# with torchrun when GPUS > 1. Uses WORK, STEPS, MODEL, LOSS, WORKERS and TRAIN_FLAGS; LOSS_FLAGS (batch shape
# and margin warm-up) follow LOSS unless set: GE2E wants many utterances per speaker, the others two.
if [[ -z ${LOSS_FLAGS:-} ]]; then
  case ${LOSS:-ge2e} in
    ge2e|softmax|contrast) LOSS_FLAGS=${GE2E_BATCH:-} ;;
    *) LOSS_FLAGS=${PAIR_BATCH:-} ;;
  esac
fi
dvector check "$WORK/shards"
if [[ ${GPUS:-1} -gt 1 ]]; then
  TRAIN=(torchrun --nproc-per-node="$GPUS" -m dvector train)
else
  TRAIN=(dvector train)
fi
if [[ -e $WORK/run/checkpoints/latest.pt ]]; then RESUME=(-c "$WORK/run"); else RESUME=(); fi
# shellcheck disable=SC2086
"${TRAIN[@]}" "$WORK/shards" "$WORK/run" -i "$STEPS" --model "$MODEL" --loss "${LOSS:-ge2e}" -w "$WORKERS" \
  $TRAIN_FLAGS $LOSS_FLAGS "${RESUME[@]}"
