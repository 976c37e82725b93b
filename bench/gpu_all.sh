#!/usr/bin/env bash
# What a lent GPU machine runs, in stages that each fit one device call (one command <= 10 min; a
# session has 15 min of device time, machine start included). Stage 1 first: it is the one that matters.
#
#   bash bench/gpu_all.sh 1   correctness (pytest -m gpu), the sm_90 audit, headline rows of advantage,
#                             policy_loss, logprob, attention at one shape each: <= 6 min, install included
#   bash bench/gpu_all.sh 2   logprob full table (3 shapes x fwd / fwd+bwd / policy loss)      <= 9.5 min
#   bash bench/gpu_all.sh 3   attention full table (16k / 32k / 64k tokens, fwd and fwd+bwd)   <= 9.5 min
#   bash bench/gpu_all.sh 4   policy_loss, advantage and weight_sync full tables               <= 9.5 min
#   bash bench/gpu_all.sh 5   train_step (0.5B / 1.5B-shaped) and trl_step                     <= 9.5 min
#   bash bench/gpu_all.sh 6   attention GPU tests under compute-sanitizer memcheck            <= 9.5 min
#
# Device tool, stage 1: command `bash bench/gpu_all.sh 1`, carry [".whl"], timeout_s 420 (bench/RESULTS.md
# says which wheels go in .whl/). Every step has its own timeout, capped by what is left of the stage.
# What comes back: $OUT/stage<N>.log (everything printed) and $OUT/stage<N>.tar (each benchmark's CSV and
# PNG, summary.txt with one line per benchmark, pytest's JUnit XML, build logs), rebuilt after every step
# so a timeout still returns what finished. Without $OUT (not under the device tool): bench/results/gpu/.
# Dry run of the mechanics on a CPU machine: WZ_BENCH_DEVICE=cpu WZ_BENCH_SIZE=quick bash bench/gpu_all.sh 1
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-1}
case "$stage" in 1|2|3|4|5|6) ;; *) echo "usage: bash bench/gpu_all.sh STAGE (1-6)" >&2; exit 2 ;; esac
OUT=${OUT:-$PWD/bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=${WZ_BENCH_DEVICE:-cuda}
SIZE_OVERRIDE=${WZ_BENCH_SIZE:-}
STAGE_SECONDS=(0 345 560 560 560 560 560)  # stage 1: 6 min less the time to pack and return
work=/tmp/wz_gpu_stage$stage
summary=$work/summary.txt
status=0
ext_pid=

note() { echo "$*" | tee -a "$summary"; }  # a line for the summary (and the log)

pack() {  # the tar is rebuilt whole after every step: whatever is there when time runs out comes back
  tar -C "$work" -cf "$OUT/stage$stage.tar.part" . && mv -f "$OUT/stage$stage.tar.part" "$OUT/stage$stage.tar"
}

run() {  # run NAME SECONDS CMD...: CMD under min(SECONDS, what is left of the stage)
  local name=$1 want=$2 left limit t0 rc
  shift 2
  left=$((deadline - SECONDS))
  if ((left < 15)); then note "$name: not run (stage time used up)"; status=1; return 99; fi
  limit=$((want < left ? want : left))
  echo "=== $name (limit ${limit} s; ${left} s left in stage $stage; $(date -u +%H:%M:%S) UTC) ==="
  t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  rc=$?
  if ((rc == 124 || rc == 137)); then
    note "$name: TIMED OUT after $((SECONDS - t0)) s (limit ${limit} s)"; status=1
  elif ((rc != 0)); then
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"; status=1
  else
    echo "=== $name: ok in $((SECONDS - t0)) s"
  fi
  return $rc
}

bench() {  # bench NAME SECONDS [python -m bench options]: one table; its CSV, PNG and summary line kept
  local name=$1 want=$2 before rc
  shift 2
  before=$(wc -l <"$summary")
  local size=()
  [ -n "$SIZE_OVERRIDE" ] && size=(--size "$SIZE_OVERRIDE")
  run "bench $name" "$want" python3 -m bench "$name" --device "$DEVICE" --out-dir "$work" --summary "$summary" \
    "$@" "${size[@]}"
  rc=$?
  if ((rc != 0 && rc != 99 && rc != 124 && rc != 137)) && (($(wc -l <"$summary") == before)); then
    note "$name: exit $rc before its summary (see the log)"
  fi
  pack
}

env_info() {  # ~5 s
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1 | tee "$work/gpu_start.csv"
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)" | tee "$work/versions.txt"
}

install() {  # carried wheels (~5 s), then the project editable without the CUDA extension (~10 s)
  if ls .whl/*.whl >/dev/null 2>&1; then
    run "carried wheels" 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if python3 -c "import sys, wz_kernels; sys.exit(not wz_kernels.__file__.startswith('$PWD/'))" 2>/dev/null; then
    echo "wz-engine: already installed from this tree"
  else
    run "editable install" 120 env WZ_BUILD_CUDA=0 python3 -m pip install -q --no-deps --no-build-isolation -e . \
      || note "editable install failed: running from the tree"
  fi
  python3 - <<'PY' | tee -a "$summary"
import importlib.util
for module, pip_name in (("trl", "trl"), ("datasets", "datasets"), ("liger_kernel", "liger-kernel"),
                         ("cut_cross_entropy", "cut-cross-entropy"), ("flash_attn", "flash-attn")):
    if importlib.util.find_spec(module) is None:
        print(f"peer {pip_name}: not installed here: its rows say 'skipped'")
PY
}

build_extension() {  # the CUDA extension wz_kernels._C: ~60 s (torch's extension headers dominate)
  if ls kernels/_C*.so >/dev/null 2>&1; then echo "CUDA extension: already built"; return; fi
  if ! python3 -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    note "CUDA extension: no CUDA torch here: not built"; return
  fi
  rm -rf /tmp/wz_ext
  # built outside the tree and copied in when done: a test process never sees a half-written module
  (MAX_JOBS=8 timeout 300 python3 setup.py -q build_ext --build-lib /tmp/wz_ext/lib --build-temp /tmp/wz_ext/tmp \
    >"$work/extension_build.log" 2>&1) &
  ext_pid=$!
}

wait_extension() {
  [ -z "$ext_pid" ] && return 0
  local t0=$SECONDS rc
  wait "$ext_pid"
  rc=$?
  ext_pid=
  if ((rc == 0)) && cp /tmp/wz_ext/lib/wz_kernels/_C*.so kernels/; then
    echo "CUDA extension: built (waited $((SECONDS - t0)) s for it)"
  else
    note "CUDA extension: build FAILED (exit $rc): extension_build.log in the tar"
    tail -n 20 "$work/extension_build.log"
    status=1
  fi
}

gpu_tests() {  # pytest NAME SECONDS [pytest args]
  local name=$1 want=$2
  shift 2
  run "$name" "$want" python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$work/$name.xml" "$@"
  local rc=$?
  ((rc == 5)) && note "$name: no test selected"  # pytest's "nothing collected"
  ((rc != 0 && rc != 5 && rc != 99)) && note "$name: FAILED (exit $rc; failures above in the log)"
  pack
}

stage1() {
  # Plan (one H100/H200, estimates): env 5 s, wheels + editable install 15 s, the extension builds in the
  # background meanwhile (~60 s); GPU tests except weight pack ~90 s (Triton compiles dominate); weight-pack
  # tests ~15 s; audit ~30 s; headline rows: advantage ~35 s, policy_loss ~35 s, logprob ~60 s, attention
  # ~60 s (each: ~5 s imports, ours' Triton compile, its check against float64, then every provider with
  # torch.compile / FlexAttention capped at 20 s). Sum ~345 s; the step limits below cap each part.
  env_info
  install
  build_extension
  gpu_tests pytest_gpu 150 tests/ -k "not weight_pack"
  wait_extension
  gpu_tests pytest_gpu_weight_pack 60 tests/ -k weight_pack
  if [ -f bench/audit.py ]; then
    run "audit" 60 python3 -m bench audit || note "audit: FAILED (see the log)"
  else
    note "audit: bench/audit.py is not in this tree: skipped"
  fi
  pack
  local headline=(--size headline --compile-budget 20)
  bench advantage 45 "${headline[@]}"
  bench policy_loss 50 "${headline[@]}"
  bench logprob 90 "${headline[@]}"
  bench attention 80 "${headline[@]}"
}

stage2() { env_info; install; bench logprob 540 --compile-budget 60; }
stage3() { env_info; install; bench attention 540 --compile-budget 60; }
stage4() {
  env_info; install; build_extension; wait_extension
  bench policy_loss 240 --compile-budget 60
  bench advantage 90 --compile-budget 60
  bench weight_sync 150
}
stage5() { env_info; install; bench train_step 400; bench trl_step 140; }
stage6() {
  env_info; install
  run "compute-sanitizer memcheck: attention GPU tests" 540 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_attention.py \
    || note "compute-sanitizer memcheck on the attention GPU tests: FAILED or errors found (see the log)"
}

main() {
  rm -rf "$work" && mkdir -p "$work" && : >"$summary"
  start=$SECONDS
  deadline=$((start + STAGE_SECONDS[stage]))
  echo "=== bench/gpu_all.sh stage $stage: $(date -u) ==="
  "stage$stage"
  nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv >"$work/gpu_end.csv" 2>&1
  pack
  echo "=== stage $stage summary ($((SECONDS - start)) s; results: $OUT/stage$stage.tar) ==="
  cat "$summary"
  return $status
}

main 2>&1 | tee "$OUT/stage$stage.log"
exit "${PIPESTATUS[0]}"
