#!/usr/bin/env bash
# One-shot GPU check of beyondlm, run from the repo root on the GPU machine (device `run`, carry .whl):
#   bash benchmarks/gpu_check.sh
# 1. installs the wheels in .whl (what the machine lacks: dvclive + the part of dvc it imports,
#    datasets, faiss-cpu, mauve-text) into /tmp/site; 2. reports versions and CUDA, fails fast (exit 3/4)
#    if a module does not import or no GPU is seen; 3. runs the tests of training, objectives, align,
#    reward, vq, ebm, lookup and logprobs on the device accelerate picks (CUDA), then reruns only
#    the failures with CUDA hidden, so each failure reads as CUDA-only or not; 4. the SFT smoke of
#    benchmarks/gpu_check.py (stages.prepare + stages.sft, bf16 and fp32) → $OUT/gpu_check.json.
# Everything it writes for the caller goes to $OUT (a temp dir if unset).
#
# Locally (no GPU, no wheels), e.g. to try step 4 with few steps:
#   BEYONDLM_GPU_CHECK_PY=.venv/bin/python BEYONDLM_GPU_CHECK_NO_INSTALL=1 BEYONDLM_GPU_CHECK_ALLOW_CPU=1 \
#   BEYONDLM_GPU_CHECK_SKIP_TESTS=1 BEYONDLM_GPU_CHECK_SMOKE_ARGS="--steps 20 --extra-steps 0 --n-train 1000" \
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${BEYONDLM_GPU_CHECK_PY:-python3}
OUT=${OUT:-$(mktemp -d)}
SITE=/tmp/site
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STATUS=0
say() { printf '\n===== %s (%s)\n' "$*" "$(date +%T)"; }

# --- 1. wheels -------------------------------------------------------------------------------------
if [ -z "${BEYONDLM_GPU_CHECK_NO_INSTALL:-}" ]; then
  say "install .whl → $SITE"
  ls .whl/*.whl >/dev/null 2>&1 || { echo "FAIL: no wheels in .whl (carry .whl)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "FAIL: pip could not install .whl/*.whl"; exit 2; }
  # Subprocesses that set their own PYTHONPATH (tests run stages with PYTHONPATH=<repo>) still see the
  # wheels through a .pth file; a .pth path comes after site-packages, so nothing there is shadowed.
  PURELIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$SITE" > "$PURELIB/zz_beyondlm_gpu_check.pth" 2>/dev/null || echo "note: $PURELIB not writable; PYTHONPATH only"
  export PYTHONPATH="$SITE:$ROOT"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- 2. environment and imports (fail fast) -------------------------------------------------------
say "environment"
command -v nvidia-smi >/dev/null && nvidia-smi -L && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
REQUIRE_CUDA=--require-cuda
[ -n "${BEYONDLM_GPU_CHECK_ALLOW_CPU:-}" ] && REQUIRE_CUDA=
"$PY" -m benchmarks.gpu_check env --out "$OUT" $REQUIRE_CUDA || { rc=$?; echo "FAIL: environment (exit $rc)"; exit $rc; }

# --- 3. tests on the device accelerate picks ------------------------------------------------------
# Left out: test_distributed (torchrun + gloo DDP), test_dispatch / test_pipeline_e2e /
# test_reproduce_noop / test_tracking / test_remote (prefect, mlflow, the dvc CLI, moto: not carried),
# test_dvcgraph / test_validate (dvc.repo graph checks, no device code), test_report / test_graph /
# test_sources / test_hh (data and reports, no device code). Most important first: a timeout keeps them.
TESTS=${BEYONDLM_GPU_CHECK_TESTS:-"tests/test_training.py tests/test_logprobs.py tests/test_objectives_sft.py tests/test_objectives_preference.py
  tests/test_config.py tests/test_reward.py tests/test_align.py tests/test_vq.py tests/test_ebm.py
  tests/test_ebm_experiment.py tests/test_lookup.py tests/test_gate.py tests/test_grf.py tests/test_bigram.py
  tests/test_prepare_eval.py tests/test_oracle.py tests/test_bad_inputs.py"}
TIMEOUT_OPT=
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout 120"
# The cache (in /tmp, not the repo) is what lets step 3b rerun exactly the failures.
PYTEST=("$PY" -m pytest -q -o cache_dir=/tmp/beyondlm_pytest_cache -m "not slow" $TIMEOUT_OPT)
if [ -z "${BEYONDLM_GPU_CHECK_SKIP_TESTS:-}" ]; then
  say "3a. pytest on the default device"
  rm -rf /tmp/beyondlm_pytest_cache  # --lf below must see this run's failures only
  # No -x: this runs once, so every failure is worth seeing; --maxfail bounds a wholesale breakage.
  timeout "${BEYONDLM_GPU_CHECK_TEST_S:-200}" "${PYTEST[@]}" --maxfail=40 --junitxml="$OUT/pytest_cuda.xml" \
    $TESTS 2>&1 | tee "$OUT/pytest_cuda.log"
  rc=$?
  echo "pytest (default device) exit $rc"
  if [ $rc -ne 0 ]; then
    STATUS=1
    say "3b. the failures again with CUDA hidden (pass here = a CUDA-only failure)"
    CUDA_VISIBLE_DEVICES="" timeout "${BEYONDLM_GPU_CHECK_RERUN_S:-60}" "${PYTEST[@]}" --lf --lfnf=none \
      $TESTS 2>&1 | tee "$OUT/pytest_cpu_rerun.log"
    echo "pytest rerun (CPU) exit $?"
  fi
fi

# --- 4. SFT smoke through the stages ---------------------------------------------------------------
say "4. sft smoke"
timeout "${BEYONDLM_GPU_CHECK_SMOKE_S:-180}" "$PY" -m benchmarks.gpu_check smoke --out "$OUT" \
  ${BEYONDLM_GPU_CHECK_SMOKE_ARGS:-} 2>&1 | tee "$OUT/smoke.log"
rc=$?
echo "smoke exit $rc"
[ $rc -ne 0 ] && STATUS=1
say "done: exit $STATUS; files in $OUT"
ls -la "$OUT"
exit $STATUS
