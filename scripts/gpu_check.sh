#!/usr/bin/env bash
# GPU check: on a CUDA host, install the gpu extra and run, in under ~8 minutes once installed:
#   1. the Triton kernels compiled for CUDA (not the interpreter) against the torch path,
#      V = 49,152 and 151,936 (scripts/gpu_kernels_check.py);
#   2. the plugin on vLLM's V1 GPU runner: exactness at T = 0 (identical ids) and T = 1
#      (distribution test) for plain, bebop fixed k and bebop auto (tests/test_exactness.py);
#   3. the GPU half of benchmarks/bench_rejection.py (--device cuda, reduced grid);
#   4. the GPU half of benchmarks/bench_rollout.py (--quick; GPU_CHECK_FULL=1: the full sweep).
# Every step runs even when an earlier one fails; results go to one folder (default
# gpu_check_results/<UTC time>), with a summary.md and each step's log. Exit status: the
# number of failed steps.
#
#   scripts/gpu_check.sh [OUT_DIR]
#   GPU_CHECK_SKIP_SETUP=1   use the existing .venv as is (no ./run setup)
#   GPU_CHECK_FULL=1         bench_rollout's full sweep and rollout (tens of minutes)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$REPO/gpu_check_results/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
unset TRITON_INTERPRET

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no CUDA device (nvidia-smi -L failed); this script is for GPU hosts" >&2
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

if [[ "${GPU_CHECK_SKIP_SETUP:-0}" != 1 ]]; then
  start=$(date +%s)
  BEBOP_EXTRA=gpu ./run setup > "$OUT/setup.log" 2>&1 || { echo "gpu_check: setup failed, see $OUT/setup.log" >&2; exit 2; }
  echo "setup: $(( $(date +%s) - start )) s" >&2
fi
PY="${BEBOP_VENV:-$REPO/.venv}/bin/python"
"$PY" - > "$OUT/environment.json" <<'PY'
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)}
for mod in ("vllm", "triton"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:
        info[mod] = f"import failed: {exc}"
print(json.dumps(info, indent=1))
PY

declare -a NAMES RCS SECS
step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local start rc
  start=$(date +%s)
  echo "gpu_check: $name ..." >&2
  timeout --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  NAMES+=("$name"); RCS+=("$rc"); SECS+=("$(( $(date +%s) - start ))")
  echo "gpu_check: $name rc=$rc in ${SECS[-1]} s (log: $OUT/$name.log)" >&2
}

# 1. kernels on CUDA (~1 min incl. Triton compilation)
step kernels 240 "$PY" scripts/gpu_kernels_check.py "$OUT/kernels.json"

# 2. plugin exactness on the V1 GPU runner: three engines (~3 min)
step exactness 360 env BEBOP_EXACTNESS_ENGINES=plain,bebop,bebop_auto \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_exactness.py --junitxml="$OUT/exactness.xml"

# 3. bench_rejection, GPU half, reduced grid (~1 min); results are written under benchmarks/results
step bench_rejection 240 "$PY" benchmarks/bench_rejection.py --device cuda --batch-sizes 1 8 64 256 --ks 1 3 \
  --repeats 5 --repeats-large 3 --out-name rejection_cuda
cp benchmarks/results/rejection_cuda.json benchmarks/results/rejection_cuda.md "$OUT/" 2>/dev/null

# 4. bench_rollout, GPU half: quick (~2-3 min: three engine starts) unless GPU_CHECK_FULL=1
if [[ "${GPU_CHECK_FULL:-0}" == 1 ]]; then
  step bench_rollout 3600 "$PY" benchmarks/bench_rollout.py --dtype bfloat16 --cuda-graphs --out "$OUT/rollout"
else
  step bench_rollout 420 "$PY" benchmarks/bench_rollout.py --quick --dtype bfloat16 --out "$OUT/rollout"
fi

failed=0
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "Device: $(nvidia-smi -L | head -1). Environment: \`$(tr -d '\n' < "$OUT/environment.json")\`"
  echo
  echo "| step | exit status | seconds |"
  echo "|---|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${RCS[$i]} | ${SECS[$i]} |"
    [[ "${RCS[$i]}" == 0 ]] || failed=$((failed + 1))
  done
  echo
  echo "Exactness summary: $(tail -1 "$OUT/exactness.log" 2>/dev/null)"
  echo
  echo "Kernels: $(tail -1 "$OUT/kernels.log" 2>/dev/null)"
  [[ -f "$OUT/rollout.md" ]] && { echo; cat "$OUT/rollout.md"; }
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exit "$failed"
