#!/usr/bin/env bash
# Everything GPU-side in one command and one table, within 8 minutes on one H100 or H200:
#   bash benchmarks/gpu.sh            # writes $OUT/gpu_table.md (default OUT=gpu_out) and prints it
# For a CUDA machine that already has torch, transformers and triton (no network needed): installs this
# checkout without dependencies, runs the GPU kernel tests (tests/test_kernels_gpu.py, bf16 against the
# float64 reference) and benchmarks/gpu_table.py (attention kernel vs SDPA's flash backend, extend prefill vs
# SDPA at 32k and 128k, MoE dispatch, tiling memory, longest fine-tune step), and appends the stack and the
# test summary to the table. Context parallelism needs 2+ GPUs and is separate:
#   torchrun --nproc_per_node N benchmarks/longest_sequence.py --device cuda --context_parallel
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False): nothing was run." >&2
    echo "On a CPU, 'python benchmarks/gpu_table.py --device cpu --smoke' checks the script on tiny inputs." >&2
    exit 2
fi
unset TRITON_INTERPRET
"$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1
STACK=$("$PYTHON" -c "import sys, torch, transformers, triton; print(f'python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}')")
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
# Kernel tests: at most 100 s (Triton compiles every variant once).
timeout 100 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py > "$OUT/tests.txt" 2>&1
TESTS=$(grep -E "passed|failed|error" "$OUT/tests.txt" | tail -1)
TESTS=${TESTS:-"no summary (timed out after 100 s?)"}
# The table: 330 s of measurements, killed at 360 s.
timeout 360 "$PYTHON" benchmarks/gpu_table.py --budget 330 --out "$OUT/gpu_table.md" > "$OUT/gpu_table.log" 2>&1
STATUS=$?
if [ ! -s "$OUT/gpu_table.md" ]; then  # killed before it wrote the file: keep the rows it printed
    grep "^|" "$OUT/gpu_table.log" > "$OUT/gpu_table.md"
fi
{
    echo "| tests | tests/test_kernels_gpu.py | ${TESTS//|/;} | | |"
    echo
    echo "GPU: $GPU; $STACK; gpu_table.py exit status $STATUS."
} >> "$OUT/gpu_table.md"
cat "$OUT/gpu_table.md"
