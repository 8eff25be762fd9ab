#!/usr/bin/env bash
# The project's own GPU numbers, on one GPU, in under 8 minutes (see docs/gpu-check.md):
#
#     bash scripts/gpu_check.sh [OUT_DIR]
#
# OUT_DIR (default gpu-check-<UTC time>) receives at most six files: gpu-check.log (every
# command and its output), preflight.json, preflight.md, preflight.png, train-metrics.jsonl
# and timings.txt. Checkpoints and datasets go to a scratch directory (WORK_DIR, default a
# new one under /tmp), removed at the end. PY is the Python to run the scripts with:
# `uv run python` where uv is installed, else python3 (a machine image with torch in it).
# Every command has its own time limit, so that one that hangs cannot spend the rest.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=$(realpath -m "${1:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}")
WORK_DIR=${WORK_DIR:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
if [ -z "${PY:-}" ]; then
    if command -v uv >/dev/null 2>&1; then PY="uv run python"; else PY=python3; fi
fi
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
export PYTHONUNBUFFERED=1
STARTED=$(date +%s)

# The whole script ends within BUDGET_S (default 470 s, under 8 minutes): each step runs
# for at most its own limit and at most what is left; a step with no time left is skipped.
BUDGET_S=${BUDGET_S:-470}
DEADLINE=$(( STARTED + BUDGET_S ))

# step NAME LIMIT_SECONDS COMMAND...: run it, log it, record its wall time; a failure is
# logged and the next step runs.
step() {
    local name=$1 limit=$2
    shift 2
    local begin=$(date +%s)
    local left=$(( DEADLINE - begin ))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 5 ]; then
        echo "$name: skipped, out of time" | tee -a "$LOG" "$OUT_DIR/timings.txt"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local status=$?
    local seconds=$(( $(date +%s) - begin ))
    echo "$name: exit $status, ${seconds}s" | tee -a "$LOG" "$OUT_DIR/timings.txt"
}

nvidia-smi >>"$LOG" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" >>"$LOG" 2>&1

# 1. Model throughput, GPT-2 small at context 1024 (the 8xh100m80 preset's model), bf16
#    autocast, eager: fused QKV (the default) against three matmuls, vocabulary 50257
#    against 50304 (padded to a multiple of 64). Then compiled and padded.
BENCH="bench.py runs/8xh100m80/model.json --microbatch-size 16 --steps 10 --warmup-steps 2"
step bench-eager 45 $PY $BENCH
step bench-separate-qkv 45 $PY $BENCH --separate-qkv
step bench-pad64 45 $PY $BENCH --pad-vocab 64
step bench-compiled-pad64 90 $PY $BENCH --pad-vocab 64 --compile --warmup-steps 3

# 2. A GPT-2 small run on the demo corpus (built locally: no network needed), bf16; -f
#    finds the largest microbatch (ddp_train.py's search) and writes the split for a global
#    batch of 32 sequences (microbatch 32 unless fewer fit). Cut short, its log still shows
#    every size it tried. Four validation batches: even at microbatch 32 (-f may write it)
#    they fit in the demo's validation split (2^18 tokens).
RUN="$WORK_DIR/gpt2-small-check"
mkdir -p "$RUN"
cp runs/8xh100m80/model.json "$RUN/model.json"
cat >"$RUN/train.json" <<'EOF'
{
    "dataset": "demo",
    "microbatch_size": 16,
    "gradient_accumulation_steps": 1,
    "min_train_tokens": 3276800,
    "checkpoint_interval": 100,
    "validation_interval": 100,
    "validation_batches": 4,
    "amp_dtype": "bfloat16"
}
EOF
step find-microbatch 75 $PY ddp_train.py "$RUN" "$WORK_DIR/datasets" -f --target-global-batch 32 --write
cat "$RUN/train.json" >>"$LOG"

# 3. Preflight on that run: the whole step (DDP world of one, real data, validation and a
#    checkpoint save), compile off and on, with the projection for the run.
step preflight 150 $PY preflight.py "$RUN" "$WORK_DIR/datasets" --steps 20 --warmup-steps 3 \
    --json "$OUT_DIR/preflight.json" --markdown "$OUT_DIR/preflight.md" --chart "$OUT_DIR/preflight.png"

# 4. The run itself: 3,276,800 tokens (100 steps of 32 sequences) with its checkpoints and
#    validation, so that the projection above can be checked against it.
step train 75 $PY ddp_train.py "$RUN" "$WORK_DIR/datasets"
cp "$RUN/metrics.jsonl" "$OUT_DIR/train-metrics.jsonl" 2>/dev/null

# 5. The Llama-3-style 1.2B preset's model (vocabulary 131,072, context 2048) with
#    activation checkpointing, bf16, eager.
step bench-llama-1b-ac 60 $PY bench.py runs/llama3-1b-8xh100/model.json --microbatch-size 4 --steps 4 --warmup-steps 2 \
    --activation-checkpointing

echo "total: $(( $(date +%s) - STARTED ))s" | tee -a "$LOG" "$OUT_DIR/timings.txt"
rm -rf "$WORK_DIR"
