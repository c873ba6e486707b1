#!/usr/bin/env bash
# The first run on a GPU machine: set up, run the GPU tests and the train/memory/hope benchmarks,
# write one JSON and one markdown summary. Under 8 minutes: every step has its own time limit,
# capped by what is left of a 465 s budget for all of them (GPU_SH_BUDGET=seconds changes it).
#
#   bash benchmarks/gpu.sh [--out DIR] [--cpu-dry-run]
#
# --out DIR       where everything goes (default runs/gpu-<UTC time>): summary.json,
#                 summary.md, one log per step, the benchmarks' own JSON files, tests.xml
# --cpu-dry-run   every step on the CPU with tiny shapes (3-5 minutes on 2 busy cores):
#                 proves the script before a GPU appears. The GPU tests are collected and skipped.
#
# Setup as scripts/bootstrap.sh: torch is installed only when none is importable (an existing CUDA
# build is kept); nestlearn with its [dev,hf] extras only when something is missing; the optional
# fla kernels (flash-linear-attention) are tried on a GPU and skipped if they cannot be installed
# (an offline machine). PYTHON=/path/to/python picks the interpreter.
# A failing step is recorded (exit status, log tail in summary.md) and the next one runs; the
# script exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=gpu
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) MODE=cpu-dry-run ;;
    --out) OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-runs/gpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
export PYTHONUNBUFFERED=1

BUDGET=${GPU_SH_BUDGET:-465}  # seconds for all steps; the summary takes a few more
T0=$(date +%s)

# step NAME SECONDS COMMAND...: run with a time limit (capped by what is left of BUDGET), log to
# OUT/NAME.log, record the status and wall time (OUT/steps.tsv: name, exit status, ms, limit).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, the time budget is spent"
    printf '%s\t%s\t%s\t%s\n' "$name" 124 0 0 >> "$OUT/steps.tsv"
    return
  fi
  echo "== $name (limit ${limit}s)"
  local start rc
  start=$(date +%s%N)
  printf '$ %.300s\n' "$*" > "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - start) / 1000000 ))" "$limit" \
    >> "$OUT/steps.tsv"
  [ "$rc" -eq 0 ] || echo "   $name failed (exit $rc; 124 = time limit): see $OUT/$name.log"
  tail -n +2 "$OUT/$name.log" | tail -n 3
}

setup() {
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "no torch found; installing torch==2.13.0"
    "$PY" -m pip install --quiet "torch==2.13.0" || return 1
  fi
  if ! "$PY" -c "import nestlearn, pytest, hypothesis, tokenizers, safetensors, transformers" \
      >/dev/null 2>&1; then
    "$PY" -m pip install --quiet -e ".[dev,hf]" || return 1
  fi
  if [ "$MODE" = gpu ] && ! "$PY" -c "import fla" >/dev/null 2>&1; then
    # --no-deps: fla's requirements could replace the CUDA torch; triton comes with it.
    "$PY" -m pip install --quiet --no-deps "flash-linear-attention>=0.3" fla-core \
      || echo "flash-linear-attention not installed: the fla tests are skipped"
  fi
  "$PY" -c 'import torch, nestlearn; print("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
}

step setup 100 bash -c "$(declare -f setup); PY='$PY' MODE='$MODE' setup"
if ! "$PY" -c "import nestlearn" >/dev/null 2>&1; then
  # Not installable here (offline?): run from the checkout.
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: no CUDA device visible to torch; use --cpu-dry-run to check the script on a CPU" >&2
  exit 2
fi

if [ "$MODE" = gpu ]; then
  DEVICE=cuda
  # GPU-sized: HOPE (small) against a Transformer++ of its size at B=16, T=1024, bf16 autocast;
  # the memory layers (chunk and sequential forms) at B=2, T=2048; HOPE's mixer at T=2048.
  TRAIN=(--suite hope-vs-transformer --batch-size 16 --seq-len 1024 --steps 10 --warmup 3
         --timeout 55 train.device=cuda)
  MEMORY=(--device cuda --seq-len 2048 --repeats 2)
  HOPE=(--device cuda --seq-len 2048 --repeats 3)
  TESTS=(tests -k "cuda or gpu")
else
  DEVICE=cpu
  TRAIN=(--suite hope-vs-transformer --batch-size 1 --seq-len 32 --steps 1 --warmup 0
         --timeout 150 --no-flop-count --peak-n 256 train.device=cpu train.precision=fp32)
  MEMORY=(--device cpu --seq-len 64 --repeats 1)
  HOPE=(--device cpu --seq-len 64 --repeats 1)
  # On the CPU the CUDA cases are collected and skipped: the plumbing is what is checked.
  TESTS=(tests/models/test_devices.py tests/memory/matrix/test_forms.py -k "cuda or gpu")
fi

step tests 140 "$PY" -m pytest "${TESTS[@]}" -q -p no:cacheprovider --junitxml="$OUT/tests.xml"
step train 120 "$PY" -m nestlearn bench train "${TRAIN[@]}" \
  --json "$OUT/train.json" --markdown "$OUT/train.md"
step memory 70 "$PY" -m nestlearn bench memory "${MEMORY[@]}" --json "$OUT/memory.json"
step hope 45 "$PY" -m nestlearn bench hope "${HOPE[@]}" --json "$OUT/hope.json"

"$PY" benchmarks/_gpu_summary.py "$OUT" "$MODE" "$DEVICE"
status=$?
echo "summary: $OUT/summary.md, $OUT/summary.json"
if [ $status -ne 0 ] || awk -F'\t' '$2 != 0 { bad = 1 } END { exit !bad }' "$OUT/steps.tsv"; then
  exit 1
fi
