#!/usr/bin/env bash
# The prepared accelerator check (issue 13): a few minutes on one CUDA GPU (sized for an H200), one markdown report.
#
#   bash benchmarks/gpu_check.sh                 # writes results/gpu_check.md
#   PY=.venv/bin/python OUT=/tmp bash benchmarks/gpu_check.sh
#
# 1. the default job (MiniLM + LoRA r=8, tweets) on CUDA in bf16: test accuracy, s/step, peak CUDA memory;
# 2. benchmarks/variants.py on CUDA: LieRA vs PEFT HiRA (and LoRA vs PEFT LoRA) peak CUDA memory and step time;
# 3. benchmarks/loraga_memory.py on CUDA at ~1B: LoRA-GA's streamed estimate vs PEFT preprocess_loraga, CUDA peak;
# 4. benchmarks/scale.py --sizes 1b on CUDA: the whole LoRA-GA job, old vs new code path, per stage.
# Every section has its own time limit; a failed or timed-out section is reported (with its log's tail) and the
# others still run; the script exits non-zero if any section failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-results}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
REPORT="$OUT/gpu_check.md"
mkdir -p "$OUT"

timeout 120 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
{
  echo "# Accelerator check"
  echo
  echo "\`bash benchmarks/gpu_check.sh\` on $(date -u +%Y-%m-%dT%H:%MZ), GPU: $GPU, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo
} > "$TMP/report.md"

failed=0
# section NAME LIMIT_S CMD...: run CMD under a time limit, its log kept in $TMP/NAME.log
section() {
  local name=$1 limit=$2
  shift 2
  echo "[gpu_check] $name (limit ${limit}s)" >&2
  local start=$SECONDS rc=0
  timeout --kill-after=30 "$limit" "$@" > "$TMP/$name.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    failed=1
    {
      echo "## $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"
      echo
      echo '```'
      tail -n 30 "$TMP/$name.log"
      echo '```'
      echo
    } >> "$TMP/report.md"
    return 1
  fi
  echo "[gpu_check] $name done in $((SECONDS - start)) s" >&2
}

if section default_job 900 "$PY" run.py train.device=cuda train.precision=bf16 logger=none overwrite=true \
  "paths.results_dir=$TMP/default" "hydra.run.dir=$TMP/default/hydra"; then
  "$PY" - "$TMP/default" >> "$TMP/report.md" <<'EOF'
import json, pathlib, sys
(path,) = pathlib.Path(sys.argv[1]).rglob("result.json")
r = json.loads(path.read_text())
steps = r["steps"] or 1
print("## Default job on CUDA, bf16 (`python run.py train.device=cuda train.precision=bf16 logger=none`)\n")
print("| test accuracy | steps | s/step (train time / steps, evaluation included) | wall s | peak CUDA MiB |")
print("|---|---|---|---|---|")
mem = r.get("memory", {}).get("peak_cuda_allocated_mb")
print(f"| {r['metrics']['test/accuracy']:.4f} | {steps} | {r['train_time_s'] / steps:.3f} | {r['wall_time_s']} | {mem} |\n")
print("CPU reference (README): 86.65% test accuracy, ~0.56 s/step on 2 cores.\n")
EOF
fi

if section variants 600 "$PY" benchmarks/variants.py --device cuda --batch 32 --out "$TMP/variants.json"; then
  { echo "## LoRA / LieRA vs PEFT LoRA / HiRA, LoRA-GA init vs PEFT (\`benchmarks/variants.py --device cuda --batch 32\`)"
    echo; grep -v -i -e '^\[' -e warn "$TMP/variants.log" || true; echo; } >> "$TMP/report.md"
fi

if section loraga_memory 600 "$PY" benchmarks/loraga_memory.py --device cuda --layers 16 --hidden 2048 \
  --intermediate 5632 --batches 8 --batch 2 --length 256 --threads 16 --out "$TMP/loraga_memory.md"; then
  { sed 's/^# /## /' "$TMP/loraga_memory.md"; echo; } >> "$TMP/report.md"
fi

if section scale 900 "$PY" benchmarks/scale.py --sizes 1b --device cuda --threads 16 --length 256 --batch 4 \
  --grad-batches 8 --old-layers 14 --out "$TMP/scale.md"; then
  { sed 's/^# /## /; s/^## 1b/### 1b/' "$TMP/scale.md"; echo; } >> "$TMP/report.md"
fi

cp "$TMP/report.md" "$REPORT"
echo "[gpu_check] report: $REPORT" >&2
exit "$failed"
