#!/usr/bin/env bash
# Pretrain mosaic-bert-mini (4 layers × 256 hidden, ~12M parameters) on one GPU for a wall-clock budget, then
# fine-tune it on GLUE. Run from anywhere; everything it writes goes under OUT_DIR.
#
#   bash train/gpu_pretrain_mini.sh DATA_DIR OUT_DIR MINUTES [GLUE_DIR]
#
#   DATA_DIR  folder with train-*.txt.xz and valid.txt.xz (the shared corpus layout)
#   OUT_DIR   OUT_DIR/mosaic-bert-mini (model + pretrain_summary.json + checkpoints), OUT_DIR/glue, logs
#   MINUTES   budget of the pretraining loop; the LR schedule is fitted to it (warmup 6%, linear decay to 0
#             when the time is up). Tokenization (~1 min on 16 cores, cached), the final validation and saving
#             come on top.
#   GLUE_DIR  <task>/{train,validation}.tsv folders; default: DATA_DIR/../glue
#
# Environment knobs (defaults in brackets):
#   STAGES [pretrain,glue]   run only some stages, e.g. STAGES=glue for a second invocation
#   GLUE_TASKS [sst2,mrpc,stsb,rte,cola]
#   BATCH [512]  LR [1e-3]  WORKERS [4]  NUM_PROC [nproc]  CACHE_DIR [<repo>/.cache/tokens]
#   CONFIG [train/configs/mosaic-bert-mini.json]  (another size, e.g. for a quick smoke test)
#   EXPORT_DIR               if set, copy the final model (no checkpoints), summaries and logs there at the end
#   PYTHON [python3]
#
# Choices for a 4-layer, 256-wide model at sequence length 128:
# - batch 512 sequences (65k tokens per step): big enough to keep the GPU busy for a model this small (smaller
#   batches are bound by per-step overhead), small enough to give thousands of optimizer steps in a few minutes.
# - lr 1e-3 (the recipe's 5e-4 is for a 768-wide model at batch 4096): narrow models tolerate and need larger
#   steps, and a short run needs fast progress; warmup (6%) and gradient clipping (1.0) guard post-LN stability.
# - 30% masking in training (the recipe), validation reported at the usual 15% with fixed masks.
# - the pretraining stage skips itself when OUT_DIR/mosaic-bert-mini/pretrain_summary.json exists, so the same
#   command can be re-run (e.g. in a second session) to do only what is left.
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
DATA_DIR=$(cd "$1" && pwd)
OUT_DIR=$2
MINUTES=$3
GLUE_DIR=${4:-$DATA_DIR/../glue}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-pretrain,glue}
GLUE_TASKS=${GLUE_TASKS:-sst2,mrpc,stsb,rte,cola}
BATCH=${BATCH:-512}
LR=${LR:-1e-3}
WORKERS=${WORKERS:-4}
NUM_PROC=${NUM_PROC:-$(nproc)}
CACHE_DIR=${CACHE_DIR:-$REPO/.cache/tokens}
CONFIG=${CONFIG:-$REPO/train/configs/mosaic-bert-mini.json}

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
MODEL_DIR=$OUT_DIR/mosaic-bert-mini
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

ls "$DATA_DIR"/train-*.txt.xz "$DATA_DIR/valid.txt.xz" >/dev/null
{
    echo "date: $(date -u +%FT%TZ)"
    echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT_DIR/environment.txt"

if [[ ",$STAGES," == *",pretrain,"* ]]; then
    if [[ -f "$MODEL_DIR/pretrain_summary.json" ]]; then
        echo "pretraining already done: $MODEL_DIR/pretrain_summary.json"
    else
        resume=()
        if compgen -G "$MODEL_DIR/checkpoint-*" >/dev/null; then resume=(--resume); fi
        start=$(date +%s)
        "$PYTHON" "$REPO/train/pretrain.py" \
            --config "$CONFIG" \
            --train-files "$DATA_DIR/train-*.txt.xz" \
            --valid-files "$DATA_DIR/valid.txt.xz" \
            --cache-dir "$CACHE_DIR" --num-proc "$NUM_PROC" \
            --max-seq-len 128 --mlm-probability 0.3 --eval-mlm-probability 0.15 \
            --per-device-train-batch-size "$BATCH" --per-device-eval-batch-size 256 \
            --learning-rate "$LR" --max-minutes "$MINUTES" \
            --bf16 --attention-backend auto --dataloader-num-workers "$WORKERS" \
            --logging-steps 100 --save-steps 2000 --save-total-limit 1 --disable-tqdm \
            --output-dir "$MODEL_DIR" "${resume[@]}" 2>&1 | tee -a "$OUT_DIR/pretrain.log"
        echo "pretraining stage: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/pretrain.log"
    fi
fi

if [[ ",$STAGES," == *",glue,"* ]]; then
    start=$(date +%s)
    "$PYTHON" "$REPO/train/finetune_glue.py" \
        --model "$MODEL_DIR" --tasks "$GLUE_TASKS" --data-dir "$GLUE_DIR" \
        --output-dir "$OUT_DIR/glue" --bf16 --disable-tqdm --logging-steps 200 \
        2>&1 | tee -a "$OUT_DIR/glue.log"
    echo "GLUE stage: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/glue.log"
fi

if [[ -n "${EXPORT_DIR:-}" ]]; then
    mkdir -p "$EXPORT_DIR/mosaic-bert-mini"
    find "$MODEL_DIR" -maxdepth 1 -type f ! -name 'training_args.bin' -exec cp {} "$EXPORT_DIR/mosaic-bert-mini/" \;
    cp "$OUT_DIR"/*.log "$OUT_DIR/environment.txt" "$EXPORT_DIR/" 2>/dev/null || true
    if [[ -d "$OUT_DIR/glue" ]]; then
        mkdir -p "$EXPORT_DIR/glue"
        cp "$OUT_DIR"/glue/glue_results.* "$EXPORT_DIR/glue/" 2>/dev/null || true
    fi
    echo "exported to $EXPORT_DIR"
fi
