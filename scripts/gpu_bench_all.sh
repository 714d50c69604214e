#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one command (run from the repository root on a CUDA machine).
#
#   scripts/gpu_bench_all.sh [PHASE ...]   PHASE: verify emb rr gme load rag mixed1 probe (default: verify emb rr gme)
#
# Writes one JSON report per phase and log.txt under $OUT (default ./bench-out). When a folder .whl/ exists, its
# wheels (the project's pins: transformers 4.51.3, ...) are installed first into /tmp/site, ahead of the machine's
# own packages. Random-weight checkpoints are built once under $WEIGHTS (default /dev/shm/bench-weights) and
# reused by later phases. SMOKE=1 runs every phase with tiny geometries on the CPU (checks the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false BACKEND_ENV_FILE=/dev/null
PY=${PY:-python3}
if [ -d .whl ] && [ "${SMOKE:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { echo "wheel install failed (see $LOG)"; tail -20 "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export BENCH_WEIGHTS_ROOT=${WEIGHTS:-/dev/shm/bench-weights}
mkdir -p "$BENCH_WEIGHTS_ROOT"
if [ "${SMOKE:-0}" = 1 ]; then
  EMB=tiny-qwen3-embedding RR=tiny-qwen3-reranker GME=tiny-gme CPU="--device cpu" QUICK="--quick" TINY="--tiny"
  MIXED_DEVICES=cpu,cpu,cpu
else
  EMB=qwen3-embedding-4b RR=qwen3-reranker-4b GME=gme-qwen2-vl-2b CPU="" QUICK="" TINY=""
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c 'import sys, torch, transformers, sentence_transformers as st; print(sys.version.split()[0], "torch",
torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "sentence-transformers",
st.__version__)'
  df -h /dev/shm /tmp | tail -2
} 2>&1 | tee -a "$LOG"

run() {  # run NAME TIMEOUT COMMAND...: one phase, its output in the log, its status remembered
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local began=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - began)) s" | tee -a "$LOG"
}

PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(verify emb rr gme)
for phase in "${PHASES[@]}"; do
  case $phase in
    probe) run probe 150 $PY scripts/_probe_budget.py --random-weights $EMB ;;
    idle) run idle 120 $PY scripts/_probe_budget.py --random-weights $EMB --idle ;;
    verify) run verify 120 $PY scripts/verify_pascal.py --output "$OUT/verify_pascal.json" ;;
    emb) run emb "${EMB_TIMEOUT:-300}" $PY scripts/benchmark_local_embedding.py --random-weights $EMB \
           --duration "${DURATION:-3}" $CPU $QUICK --output "$OUT/emb.json" ;;
    rr) run rr 130 $PY scripts/benchmark_local_embedding.py --random-weights $RR $CPU $QUICK --output "$OUT/rr.json" ;;
    gme) run gme 110 $PY scripts/benchmark_local_embedding.py --random-weights $GME $CPU $QUICK \
           --output "$OUT/gme.json" ;;
    load) run load 240 $PY scripts/verify_model_loading.py ${LOAD_GEOMETRIES:---random-weights $EMB \
            --random-weights $RR --random-weights $GME} $CPU --output "$OUT/load.json" ;;
    rag) run rag 240 $PY scripts/benchmark_end_to_end_rag.py --random-weights $EMB ${RAG_RERANKER:---reranker-random-weights $RR} \
           --in-process --documents "${RAG_DOCS:-200}" --duration "${DURATION:-3}" $CPU --output "$OUT/rag.json" ;;
    mixed1) run mixed1 300 $PY scripts/benchmark_mixed_load.py --devices "${MIXED_DEVICES:-cuda:0,cuda:0,cuda:0}" \
              --in-process --duration "${DURATION:-3}" --warmup 1 $TINY --output "$OUT/mixed.json" ;;
    *) echo "unknown phase $phase" | tee -a "$LOG" ;;
  esac
done
