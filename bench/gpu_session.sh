#!/usr/bin/env bash
# The GPU checks a session lent a CUDA GPU runs, as one prepared command (estimated 4-6 minutes on an
# H200; it has not run yet: no GPU was lent since it was written):
#   1. the tests that skip without a GPU: the MoE plugin's kernels compiled for this GPU and launched
#      through the CUDA driver with torch tensors' addresses (float, fp8, nvfp4 experts), and the
#      TensorRT runtime test where a TensorRT that builds for this GPU is installed (it skips otherwise);
#   2. bench_moe_kernel.py at the released sizes: bf16, fp8 and nvfp4 experts against their byte floors;
#   3. the attention plugin's kernels launched through the driver (tests/trt/test_attention_plugin.py) and
#      bench_attention_kernel.py: a denoise step's head-512 attention at contexts 4K, 32K and 256K against its
#      byte and FLOP floors and torch's scaled_dot_product_attention (not run yet either).
# Needs torch, triton, cuda-bindings, ml-dtypes and pytest (the device image has them); nothing is installed.
# Writes its logs and the kernel bench's JSON under $OUT (a temporary folder when unset).
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: nothing to check')" || exit 2
python3 -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)"
status=0
python3 -m pytest -q -rs -p no:cacheprovider tests/trt/test_moe_launch.py tests/generation/test_tensorrt_step.py \
  tests/trt/test_attention_plugin.py \
  2>&1 | tee "$OUT/gpu_tests.log" || status=1
timeout 420 python3 bench/bench_moe_kernel.py --tokens 256 1024 --json "$OUT/moe_kernel.json" \
  2>&1 | tee "$OUT/moe_kernel.log" || status=1
timeout 300 python3 bench/bench_attention_kernel.py --json "$OUT/attention_kernel.json" \
  2>&1 | tee "$OUT/attention_kernel.log" || status=1
echo "logs in $OUT"
exit $status
