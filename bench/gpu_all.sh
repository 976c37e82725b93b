#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call: build the CUDA extension, run every GPU
# correctness test first, then every benchmark table. Tables print to stdout; CSV/PNG land in
# bench/results/ (and are copied to $OUT when the device tool sets it).
#   bash bench/gpu_all.sh            # full shapes
#   bash bench/gpu_all.sh --quick    # smoke shapes (a few minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
quick=${1:-}

# Peers that the GPU image lacks travel as wheels in .whl/ (see /work/.library/device/README.md).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || echo "editable install failed: running from the tree"
python3 - <<'PY'
import torch, triton
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
from wz_kernels._backend import cuda_extension
print("CUDA extension wz_kernels._C:", "built" if cuda_extension() is not None else "absent")
PY

status=0
echo "=== GPU correctness (pytest -m gpu) ==="
python3 -m pytest -q -m gpu tests/ -p no:cacheprovider || status=1

for name in advantage policy_loss logprob attention weight_sync trl_step train_step; do
  echo "=== bench $name ==="
  timeout 300 python3 -m bench "$name" --device cuda $quick || { echo "bench $name failed"; status=1; }
done

if [ -n "${OUT:-}" ]; then cp bench/results/*_cuda.* "$OUT"/ 2>/dev/null || true; fi
exit $status
