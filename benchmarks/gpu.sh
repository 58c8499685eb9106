#!/usr/bin/env bash
# GPU checks in one go, for a lent CUDA machine that already has torch, transformers and
# triton (no network there): installs this checkout without dependencies, runs the GPU
# kernel tests and the GPU attention and MoE benchmarks, and writes everything to $OUT
# (default gpu_out/). Usage: bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.txt" 2>&1
python -m pytest -q tests/test_kernels_gpu.py tests/test_kernels.py 2>&1 | tail -30 > "$OUT/tests.txt"
python benchmarks/attention.py --device cuda --out "$OUT/attention.md" > "$OUT/attention.log" 2>&1
python benchmarks/moe.py --repeats 5 > "$OUT/moe.md" 2>&1
cat "$OUT/gpu.txt" "$OUT/tests.txt" "$OUT/attention.md" "$OUT/moe.md"
