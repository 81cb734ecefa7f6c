#!/usr/bin/env bash
# The encoder claim (bench/encoder_claim.py) with full fine-tuning on one GPU, where the search protocol
# takes minutes instead of days: adapts the packaged Gemma 3 270M (balanced, merged), trains the adaptation
# with `encdec pretrain`'s defaults for 200 steps (not the recipe of the CPU tables' trained backbone,
# bench/frontier.py's: a vocabulary trimmed to 8,192, 20 warm-up steps, fp32 where a GPU's default is bf16,
# 16 held-out windows; its adapted-trained row is another model than theirs), and runs three backbones side by side
# on the GPU (decoder-only source, adapted encoder untrained, adapted encoder trained): BoolQ's search
# first, then the probes, then CB, COPA and RTE's searches. Each backbone's log goes to LOGS; the table of
# the cells done is printed at the end (and when DEADLINE_S seconds have passed, whatever is unfinished
# is stopped first). Resumable: cells and models already there are kept.
#
#   PYTHONPATH=src bash bench/encoder_claim_gpu.sh runs/encoder-claim-gpu
set -u
OUT=${1:-runs/encoder-claim-gpu}
MODELS=${MODELS:-$OUT/models}
LOGS=${LOGS:-$OUT}
DEADLINE_S=${DEADLINE_S:-3600}
# all of BoolQ's training split: on CPU, fine-tuning the decoder-only 270M on 1,000-4,000 examples for one epoch
# (up to 500 steps) learned only the class prior, and its frozen probe left the majority only with all 9,427
BOOLQ_TRAIN=${BOOLQ_TRAIN:-9427}
KFOLD_TASKS=${KFOLD_TASKS:-cb copa rte}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-200}
# the fine-tuning settings of every cell (bf16 autocast on the GPU), and the search grid (2 candidates: about
# 50,000 examples per backbone on BoolQ). Batch 32 because an eager step on the GPU is bound by kernel launches
# (generation's steps were, at 18-33 ms whatever the batch), so examples/s should grow with the batch: measure it
# first with `python3 bench/gpu_check.py --only fine-tuning` and set CLASSIFY / GRID from what it prints.
# The head at 1e-4, not 1e-3: at 1e-3 the 270M's predictions swung from step to step and a 2,000-example run
# answered "yes" 499 times of 500; a run at 1e-4 answered "no" 89 times (docs/benchmarks.md, "Batches of alike
# lengths, and the head's learning rate"). Batches of alike lengths: 1.35x the examples/s on BoolQ (CPU).
# (to the search cells only: `encdec classify --probe` refuses fine-tuning options)
CLASSIFY=${CLASSIFY:---precision auto --batch-size 32 --group-by-length}
GRID=${GRID:---grid-lr 1e-5,3e-5 --grid-epochs 2 --grid-head-lr 1e-4}
PROBE=${PROBE:---batch-size 32}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
START=$SECONDS
mkdir -p "$OUT" "$MODELS" "$LOGS"
left() { echo $((DEADLINE_S - (SECONDS - START))); }

claim() {  # claim NAME=MODEL: that backbone's cells, in order of importance
    local log="$LOGS/claim-${1%%=*}.log"
    local common=(--out "$OUT" --backbone "$1" --boolq-train "$BOOLQ_TRAIN" --search-args="$GRID"
                  --search-args="$CLASSIFY" --probe-args="$PROBE")  # (in the order earlier search cells recorded)
    local kfold=()
    for t in $KFOLD_TASKS; do kfold+=(--task "$t"); done
    {
        python3 bench/encoder_claim.py "${common[@]}" --protocol search --task boolq &&
        python3 bench/encoder_claim.py "${common[@]}" --protocol probe --task boolq "${kfold[@]}" &&
        python3 bench/encoder_claim.py "${common[@]}" --protocol search "${kfold[@]}"
    } >"$log" 2>&1
    echo "claim $1 ended ($?) at $((SECONDS - START)) s"
}

[ -d "$MODELS/adapted" ] || python3 -m encdec.cli adapt --encoder gemma-3-270m --out "$MODELS/adapted" 2>&1 | tail -3
if [ ! -d "$MODELS/adapted" ]; then  # (the pipe's status is tail's: a failed adapt went on to every claim)
    echo "adapting failed (its last lines are above)" >&2
    exit 1
fi
echo "adapted at $((SECONDS - START)) s"
claim decoder-only=gemma-3-270m &
claim "adapted-init=$MODELS/adapted" &
{
    [ -d "$MODELS/train/model" ] ||
        python3 -m encdec.cli pretrain --model "$MODELS/adapted" --out "$MODELS/train" --resume \
            --steps "$PRETRAIN_STEPS" \
            >"$LOGS/pretrain.log" 2>&1
    echo "pretrained ($?) at $((SECONDS - START)) s"
    [ -d "$MODELS/train/model" ] && claim "adapted-trained=$MODELS/train/model"
} &
while [ -n "$(jobs -r)" ] && [ "$(left)" -gt 0 ]; do sleep 5; done
descendants() { local c; for c in $(pgrep -P "$1"); do descendants "$c"; echo "$c"; done; }
# this script's own processes only (deepest first): a pattern would match other runs' encdec processes as well
[ -n "$(jobs -r)" ] && { echo "deadline: stopping the unfinished cells"; kill $(descendants $$) 2>/dev/null; }
wait
python3 bench/encoder_claim.py --out "$OUT" --backbone decoder-only=gemma-3-270m \
    --backbone "adapted-init=$MODELS/adapted" --backbone "adapted-trained=$MODELS/train/model" \
    --boolq-train "$BOOLQ_TRAIN" --search-args="$GRID" --search-args="$CLASSIFY" --probe-args="$PROBE" \
    --protocol search --protocol probe --table-only
