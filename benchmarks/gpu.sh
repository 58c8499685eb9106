#!/usr/bin/env bash
# GPU checks in one go, for a lent CUDA machine that already has torch, transformers and
# triton (no network there): installs this checkout without dependencies (no wheel is fetched
# or upgraded), records the stack and whether it is within pyproject.toml's declared bounds,
# runs the GPU kernel tests, the GPU attention and MoE benchmarks, and the long-sequence steps (peak
# GPU memory of each sequence-tiling option with the checkpoints offloaded to the host, the longest
# sequence one GPU fine-tunes with each option, and, with 2 GPUs or more, context parallelism's
# numerics against one GPU and its longest sequence), and writes everything to
# $OUT (default gpu_out/). Needs nothing newer than the lowest supported transformers (5.14;
# the lent machines have 5.17). Usage: bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
"$PYTHON" - >> "$OUT/gpu.txt" <<'EOF'
import re
import sys

import torch, transformers, triton
from packaging.version import Version

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")
declared = open("pyproject.toml").read()
for module in (torch, transformers):
    low = re.search(rf'"{module.__name__}>=([0-9.]+)', declared).group(1)
    within = Version(Version(module.__version__).base_version) >= Version(low)
    print(f"{module.__name__} {module.__version__}: {'within' if within else 'BELOW'} the declared >= {low}")
EOF
"$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.txt" 2>&1
"$PYTHON" -m pytest -q tests/test_kernels_gpu.py tests/test_kernels.py 2>&1 | tail -30 > "$OUT/tests.txt"
"$PYTHON" benchmarks/attention.py --device cuda --out "$OUT/attention.md" > "$OUT/attention.log" 2>&1
"$PYTHON" benchmarks/moe.py --repeats 5 > "$OUT/moe.md" 2>&1
# Long sequences: MemTracker's split on the GPU (offload shows as host memory), then the longest lengths.
"$PYTHON" benchmarks/seq_tiling.py --device cuda --tokens 32768 65536 --full_logits_max_tokens 32768 \
    > "$OUT/seq_tiling.md" 2>&1
"$PYTHON" benchmarks/longest_sequence.py --device cuda > "$OUT/longest_sequence.md" 2>&1
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -ge 2 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" benchmarks/longest_sequence.py \
        --device cuda --context_parallel >> "$OUT/longest_sequence.md" 2>&1
fi
cat "$OUT/gpu.txt" "$OUT/tests.txt" "$OUT/attention.md" "$OUT/moe.md" "$OUT/seq_tiling.md" "$OUT/longest_sequence.md"
