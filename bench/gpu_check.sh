#!/usr/bin/env bash
# The GPU checks a lent device runs in one call (docs/steering.md), most wanted first: the
# vector hooks' cost and kernel counts, PASTA and vector timings on a 0.6 B random llama, then
# the CUDA paths of the steering and vector tests (static-cache / compile tests included) on the
# llama, gpt2 and gemma3 (sliding-window) families. Each step has its own time limit, 9 minutes
# in all: one device call with timeout_s=600. Full logs (never only a tail) go to $OUT (default
# /tmp/gpu-check).
#
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The device image has torch and transformers but not the notebook packages some steering tests
# use (plotly, IPython, ipywidgets, anywidget): made here by bench/gpu_wheels.sh, carried in .whl.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl > "$out/wheels.log" 2>&1 && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } \
  > "$out/versions.txt" 2>&1
# The hooks alone: time, aten ops and CUDA kernels per decoding step (the ICV's Triton kernel:
# 1 launch per layer; its aten form: 4), bf16 as in the generation rows below.
timeout 130 python3 bench/bench_steering.py --hook-cost --device cuda --dtype bf16 --preset 0.6b \
  > "$out/hook_cost.log" 2>&1
echo "hook cost: exit $?" >> "$out/summary.txt"
# (PASTA's rows, 0.78-0.95x on an H200 in session 32, and the vector add on 2 layers, 1.03x, and
# the ICV as aten ops, 1.18x, are left out to fit the call.) The null-hook and add-on-every-layer
# rows tell the hook machinery's share of the ICV's extra time from the shift's.
timeout 250 python3 bench/bench_steering.py --device cuda --threads 8 --preset 0.6b \
  --lengths 128 2048 --methods plain "null hooks" "vector add all" "vector ICV" --repeats 3 \
  > "$out/bench.log" 2>&1
echo "bench: exit $?" >> "$out/summary.txt"
PROMPTSCOPE_TEST_DEVICE=cuda timeout 160 python3 -m pytest -q --tb=short -p no:cacheprovider \
  -k "not qwen3 and not gpt_neox and not inkling and not gemma3_vision and not gemma3n \
      and not gemma4 and not deepseek_v3 and not mistral3 and not mamba" \
  tests/test_steering.py tests/test_vectors.py \
  > "$out/tests.log" 2>&1
echo "tests: exit $?" >> "$out/summary.txt"
cat "$out/summary.txt"
