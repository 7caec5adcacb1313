#!/usr/bin/env bash
# The GPU figures, as one prepared command for a session lent a CUDA GPU (H100 or H200; estimated 6-7
# minutes on an H100, held under 8 by a deadline; it has not run yet: no GPU was lent since it was written).
# Installs nothing: torch, triton, cuda-bindings, transformers, ml-dtypes and pytest as the device image has
# them. No TensorRT there: the engine tests skip, saying so.
#   1. the review's GPU checks: the MoE plugin's launch path (its kernels compiled for this GPU, launched
#      through the CUDA driver at torch tensors' addresses, float/fp8/nvfp4 experts) eagerly and inside a
#      CUDA-graph capture in global and thread-local mode, replayed with new inputs, against the reference at
#      1 token and at the profile's maximum (256); the denoise-graph bookkeeping on its own stream (replays,
#      re-captures, a failed capture cleared and run eagerly);
#   2. the torch backend's CUDA step (generation.triton_step) against transformers on this GPU: tiny preset,
#      float, fp8 and nvfp4 experts, three canvases from a graphed denoise step, token for token; the graph
#      bit for bit against the eager step; `dllm-trt generate --backend torch --device cuda`;
#   3. bench_moe_kernel.py at the released sizes, N=256: bf16, fp8 and nvfp4 experts against their floors;
#   4. bench_cuda_step.py: the whole step at the released widths (as many layers as fit, up to 30), random
#      weights, batch 1 and 8, the three expert formats: ms per denoise step and encoder pass, per layer and
#      at 30 layers, tok/s at 16 steps per canvas, against the byte floor and against transformers.
#   5. the attention plugin's kernels (head 512) launched through the driver (tests/trt/test_attention_plugin.py)
#      and bench_attention_kernel.py: a denoise step's head-512 attention at contexts 4K, 32K and 256K against
#      its byte and FLOP floors and torch's scaled_dot_product_attention (before 4, which takes what is left).
# Logs and JSON under $OUT (a temporary folder when unset): gpu.txt, tests_launch.log, tests_step.log,
# moe_kernel.log/.json, attention.log, attention_kernel.json, cuda_step.log/.json.
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-470}  # seconds from now; the end-to-end bench gets what the parts before it left
budget() { local left=$((DEADLINE - SECONDS)); echo $((left < $1 ? (left > 10 ? left : 10) : $1)); }
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: nothing to check')" || exit 2
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader 2>/dev/null
  python3 -c "import torch, triton, transformers; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
              'triton', triton.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/gpu.txt"
status=0
# 1. under TRITON_INTERPRET=1 (these files interpret the CPU cases; the GPU cases launch compiled cubins)
timeout "$(budget 90)" python3 -m pytest -q -rs -p no:cacheprovider tests/trt/test_moe_launch.py \
  tests/generation/test_tensorrt_step.py -k "driver or cuda_graph or denoise_graph or failed_capture or engines_built" \
  2>&1 | tee "$OUT/tests_launch.log" || status=1
# 2. Triton compiles for the GPU: the interpreter must be off before triton is imported
TRITON_INTERPRET=0 timeout "$(budget 100)" python3 -m pytest -q -rs -s -p no:cacheprovider \
  tests/generation/test_triton_step.py -k on_cuda 2>&1 | tee "$OUT/tests_step.log" || status=1
# 3.
TRITON_INTERPRET=0 timeout "$(budget 80)" python3 bench/bench_moe_kernel.py --tokens 256 --iters 10 --budget-s 1 \
  --json "$OUT/moe_kernel.json" 2>&1 | tee "$OUT/moe_kernel.log" || status=1
# 5.
TRITON_INTERPRET=0 timeout "$(budget 45)" python3 -m pytest -q -rs -p no:cacheprovider tests/trt/test_attention_plugin.py \
  2>&1 | tee "$OUT/attention.log" || status=1
TRITON_INTERPRET=0 timeout "$(budget 40)" python3 bench/bench_attention_kernel.py --iters 10 \
  --json "$OUT/attention_kernel.json" 2>&1 | tee -a "$OUT/attention.log" || status=1
# 4. last: it writes its JSON after every row, so a deadline cut keeps what was measured
TRITON_INTERPRET=0 timeout "$(budget 300)" python3 bench/bench_cuda_step.py --json "$OUT/cuda_step.json" \
  2>&1 | tee "$OUT/cuda_step.log" || status=1
echo "logs in $OUT after ${SECONDS} s"
exit $status
